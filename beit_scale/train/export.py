"""Consolidated fp32 weights out of a DeepSpeed checkpoint, and export to safetensors / timm /
transformers (a directory).

`consolidated_state_dict(run_dir_or_checkpoint)` accepts a run dir (its newest valid checkpoint),
a checkpoint folder (`.../checkpoints/step_00000100`) and returns (fp32 state dict, manifest).

ZeRO 1-3 checkpoints hold fp32 master weights partitioned across ranks; DeepSpeed's
zero_to_fp32 merges them.  ZeRO 0 has no partitions: the module weights are in the model-states
file (a torch pickle written by DeepSpeed; it must be loaded with weights_only=False, which is
why we only ever hand out safetensors to others).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from beit_scale.io import save_safetensors  # noqa: F401 - re-exported: callers import it from here
from beit_scale.train.checkpoint.reader import consolidated_state_dict, resolve_checkpoint  # noqa: F401

if TYPE_CHECKING:
    from beit_scale.models.config import BeitConfig


# ============================================================================ export to files
# Everything below turns a checkpoint into a self-describing safetensors file (tensors + string
# metadata, nothing to unpickle), in our parameter names or in timm's Beit layout.

EXPORT_FORMATS = ("safetensors", "timm", "hf")
LAYOUT_OURS, LAYOUT_TIMM = "beit_scale.beit", "timm.beit"
EXPORT_VERSION = "1"
# timm registers these two sizes; our config must equal timm's defaults for them to be used by name.
# (img, patch, chans, dim, depth, heads, mlp, layer scale, rel-pos, abs pos) of timm's defaults.
_TIMM_NAMED = {
    "beit_base_patch16_224": (224, 16, 3, 768, 12, 12, 3072, 0.1, "layer", False),
    "beit_large_patch16_224": (224, 16, 3, 1024, 24, 16, 4096, 1e-5, "layer", False),
}


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why and what to do."""


def build_stage_model(cfg):
    """The model a stage trains, built from its resolved ExperimentCfg (random init, CPU).

    Uses the stage's own Task so the architecture (rel-pos, layer scale, classes) is exactly the
    one that was trained.  A classify checkpoint also builds when beit_scale.train.finetune is
    not importable (zoo defaults + the model section of the config).
    """
    from beit_scale.train.tasks import make_task
    try:
        return make_task(cfg).build_model()
    except ImportError:
        if cfg.stage != "classify":
            raise
    from beit_scale.models.zoo import build_model
    m = cfg.model
    kw = {"num_classes": m.num_classes, "img_size": m.img_size}
    for src, dst in (("drop_path", "drop_path_rate"), ("layer_scale_init", "layer_scale_init"),
                     ("rel_pos_bias", "rel_pos_bias")):
        if getattr(m, src) is not None:
            kw[dst] = getattr(m, src)
    return build_model(m.name, task="classify", **kw)


def timm_kwargs(bcfg, num_classes: int) -> dict:
    """Arguments of timm.models.beit.Beit for a (classifier-resolved) BeitConfig."""
    if bcfg.mlp_dim % bcfg.embed_dim:
        raise ExportError(f"{bcfg.name}: mlp_dim={bcfg.mlp_dim} is not a multiple of embed_dim="
                          f"{bcfg.embed_dim}; timm's Beit only takes an mlp_ratio")
    return {"img_size": bcfg.img_size, "patch_size": bcfg.patch_size, "in_chans": bcfg.in_chans,
            "embed_dim": bcfg.embed_dim, "depth": bcfg.depth, "num_heads": bcfg.num_heads,
            "mlp_ratio": bcfg.mlp_dim / bcfg.embed_dim, "init_values": bcfg.layer_scale_init or None,
            "use_abs_pos_emb": bcfg.abs_pos_emb, "use_rel_pos_bias": bcfg.rel_pos_bias == "layer",
            "use_shared_rel_pos_bias": bcfg.rel_pos_bias == "shared", "num_classes": num_classes,
            "global_pool": "avg"}


def timm_model_name(bcfg) -> str | None:
    """timm's registered name when our config is exactly timm's architecture for it, else None."""
    ref = _TIMM_NAMED.get(bcfg.name)
    if ref is None:
        return None
    mine = (bcfg.img_size, bcfg.patch_size, bcfg.in_chans, bcfg.embed_dim, bcfg.depth, bcfg.num_heads,
            bcfg.mlp_dim, float(bcfg.layer_scale_init or 0), bcfg.rel_pos_bias, bcfg.abs_pos_emb)
    return bcfg.name if mine == ref else None


def create_timm_model(metadata: dict):
    """An empty timm Beit matching an export's metadata (timm.create_model by name when it exists)."""
    import timm
    kw = json.loads(metadata["timm_kwargs"])
    name = metadata.get("timm_model", "")
    if name and name != "Beit":
        return timm.create_model(name, pretrained=False, num_classes=kw["num_classes"])
    from timm.models.beit import Beit
    return Beit(**kw)


def _mim_backbone_to_timm(bcfg, sd: dict) -> tuple[dict, "BeitConfig"]:
    """A MIM state dict -> the backbone of a timm Beit (num_classes=0, global_pool='avg').

    What a timm user gets from `timm.create_model('beit_base_patch16_224', num_classes=0)`:
    per-layer rel-pos tables (the shared pretraining table copied into every block, as BEiT
    fine-tuning does: outputs are unchanged), no mask token / LM head / final token norm, and
    fc_norm at its fresh init (weight 1, bias 0) since pretraining never trained a pooled norm.
    """
    from beit_scale.models.convert import adapt_state_dict_to, to_timm
    target = bcfg.replace(rel_pos_bias="layer" if bcfg.rel_pos_bias in ("layer", "shared") else "none",
                          num_classes=0)
    out = adapt_state_dict_to(target, sd, task="classify")
    out["fc_norm.weight"] = torch.ones(bcfg.embed_dim)
    out["fc_norm.bias"] = torch.zeros(bcfg.embed_dim)
    return to_timm(out), target


def export_checkpoint(path: str | Path, fmt: str = "safetensors", out: str | Path | None = None,
                      verify: bool = True) -> tuple[Path, dict]:
    """Export a run dir / checkpoint folder to one safetensors file; returns (file, metadata).

    fmt='safetensors': our parameter names, the whole model of the stage (MIM: backbone + mask
    token + final norm + LM head; classify: backbone + head; tokenizer: the dVAE, written so that
    the MIM stage can load it as tokenizer.checkpoint).
    fmt='timm': timm's Beit names and layout (classify: loads strictly into timm with the same
    num_classes; MIM: the backbone, see _mim_backbone_to_timm).  verify=True loads the result
    strictly into a timm model before writing.
    fmt='hf': a directory (config.json + model.safetensors) for transformers' BEiT classes; the
    returned path is the directory (default RUN/exports/<model>-<stage>-step<N>-hf).
    """
    from beit_scale.config import from_dict
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")
    ckpt = resolve_checkpoint(path, checksums=True)
    sd, manifest = consolidated_state_dict(ckpt)
    stage, step = manifest.get("stage"), int(manifest["step"])
    if stage not in ("tokenizer", "mim", "classify"):
        raise ExportError(f"{path}: manifest has stage={stage!r}; expected tokenizer, mim or classify")
    if stage == "tokenizer" and fmt in ("timm", "hf"):
        raise ExportError(f"{path} is a tokenizer (dVAE) checkpoint: {fmt} has no dVAE, so --format {fmt} "
                          f"does not apply; use --format safetensors (a tokenizer file for tokenizer.checkpoint)")
    cfg = from_dict(manifest["config"])
    model = build_stage_model(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: the checkpoint's weights do not match the model its own config "
                          f"describes ({manifest.get('model')}, stage {stage}): {e}") from None
    ours = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
            for k, v in model.state_dict().items()}
    meta = {"format_version": EXPORT_VERSION, "stage": stage, "step": step,
            "model": manifest.get("model") or cfg.model.name,
            "source": str(ckpt), "samples_seen": manifest.get("samples_seen", ""),
            "experiment_config": json.dumps(manifest["config"], sort_keys=True)}

    if stage == "tokenizer":
        from dataclasses import asdict
        from beit_scale.models.dvae import FORMAT, FORMAT_VERSION
        # The dVAE file format (models/dvae.py) so that load_tokenizer reads the export directly.
        meta.update(format=FORMAT, dvae_format_version=FORMAT_VERSION,
                    config=json.dumps(asdict(model.cfg), sort_keys=True),
                    vocab_size=model.cfg.vocab_size, img_size=model.cfg.image_size, task="tokenizer")
        tensors = ours
    else:
        bcfg = model.cfg
        meta.update(task=model.task, img_size=bcfg.img_size, patch_size=bcfg.patch_size,
                    model_config=json.dumps(bcfg.to_dict(), sort_keys=True))
        if stage == "mim":
            meta["mim_target"] = model.target  # pixels: lm_head has patch_size^2 * 3 outputs, no vocabulary
            if model.target == "tokens":
                meta["vocab_size"] = bcfg.vocab_size
        else:
            meta["num_classes"] = bcfg.num_classes
        if fmt == "hf":
            out = out or Path(meta["source"]).parent.parent / "exports" / f"{meta['model']}-{stage}-step{step}-hf"
            return _write_hf_dir(model, meta, out)
        if fmt == "safetensors":
            meta.update(format=LAYOUT_OURS, contents="backbone+" + ("mim_head" if stage == "mim" else "classifier_head"))
            tensors = ours
        else:
            from beit_scale.models.convert import to_timm
            if stage == "mim":
                tensors, tcfg = _mim_backbone_to_timm(bcfg, ours)
                n, contents = 0, "backbone (MIM head, mask token and final norm dropped; shared rel-pos copied per layer)"
            else:
                tensors, tcfg, n, contents = to_timm(ours), bcfg, bcfg.num_classes, "backbone+classifier_head"
            meta.update(format=LAYOUT_TIMM, contents=contents, num_classes=n,
                        timm_model=timm_model_name(tcfg) or "Beit",
                        timm_kwargs=json.dumps(timm_kwargs(tcfg, n), sort_keys=True))
            if verify:
                tm = create_timm_model({k: str(v) for k, v in meta.items()})
                try:
                    tm.load_state_dict(tensors, strict=True)
                except RuntimeError as e:
                    raise ExportError(f"the timm export does not load strictly into {meta['timm_model']} "
                                      f"(timm {__import__('timm').__version__}): {e}") from None
    if out is None:
        root = Path(meta["source"]).parent.parent
        out = root / "exports" / f"{meta['model']}-{stage}-step{step}-{fmt}.safetensors"
    meta = {k: str(v) for k, v in meta.items()}
    return save_safetensors(tensors, out, meta), meta


def _write_hf_dir(model, meta: dict, out: str | Path) -> tuple[Path, dict]:
    """A transformers directory: ``config.json`` + ``model.safetensors`` in the names and layout
    of BeitForImageClassification (classify) / BeitForMaskedImageModeling (MIM), which BeitModel
    also loads (models/hf.py). Returns (directory, the safetensors metadata)."""
    from beit_scale.io import atomic_write_text
    from beit_scale.models.hf import hf_config, to_hf
    if getattr(model, "target", "tokens") != "tokens":
        raise ExportError(f"{meta['source']}: a mim.target={model.target} run has no transformers "
                          f"class (BeitForMaskedImageModeling predicts visual tokens); export it with "
                          f"--format timm (the backbone) or --format safetensors")
    meta.update(format="pt", layout="transformers.beit", contents=f"{model.task} model, transformers names")
    meta = {k: str(v) for k, v in meta.items()}  # "format": "pt" is what transformers checks for
    cfg = hf_config(model.cfg, model.task)
    cfg["beit_scale_export"] = {k: meta[k] for k in ("model", "stage", "step", "source")}
    out = Path(out)
    save_safetensors(to_hf(model.state_dict()), out / "model.safetensors", meta)
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out, meta


def read_export_metadata(path: str | Path) -> dict:
    """The string metadata of an exported file (no tensors loaded)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
