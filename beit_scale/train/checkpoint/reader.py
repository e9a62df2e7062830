"""Reading weights: out of beit_scale checkpoints, and from anything `init.from` accepts.

`consolidated_state_dict(run_dir_or_checkpoint)` accepts a run dir (its newest valid checkpoint),
a checkpoints dir or a checkpoint folder (`.../checkpoints/step_00000100`) and returns
(fp32 state dict, manifest).

ZeRO 1-3 checkpoints hold fp32 master weights partitioned across ranks; DeepSpeed's
zero_to_fp32 merges them (through the engine module).  ZeRO 0 has no partitions: the module
weights are in the model-states file (a torch pickle written by DeepSpeed; it must be loaded
with weights_only=False, which is why we only ever hand out safetensors to others).

`load_init_weights(model, source) -> InitReport`: put the weights behind `init.from` into a
freshly built model.  `source` is a run dir (its newest valid checkpoint), a checkpoint folder,
a safetensors file we exported, a timm BEiT state dict (.safetensors / .pth / .bin), or a
transformers BEiT directory (`config.json` + weights; models/hf.py maps the names).  The MIM
head and [MASK] token are dropped, a shared relative-position table is copied into every block,
tables and absolute position embeddings are resized when the resolution differs, and the
classifier head is re-initialised when the class count differs.  Anything else that does not
fit (missing backbone weights, a shape mismatch, a file that is not BEiT) is a ConfigError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from beit_scale.config import ConfigError
from beit_scale.models.convert import unwrap_state_dict
from beit_scale.train.checkpoint.layout import COMPLETE, MANIFEST, complete_checkpoints_in, verify


def resolve_checkpoint(path: str | Path, checksums: bool = False) -> Path:
    """A checkpoint folder from a run dir / checkpoints dir / checkpoint folder; checksums=True
    also checks every file's CRC32 (a run dir then falls back past a corrupted newest one)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name == "checkpoints" and p.is_dir():
        for c in reversed(complete_checkpoints_in(p)):
            if verify(c, checksums=checksums) is None:
                return c
        raise FileNotFoundError(f"{path}: no complete, intact checkpoint in {p} (saves that did not finish "
                                f"have no {COMPLETE} marker; checksum failures are skipped too)")
    if not (p / MANIFEST).exists():
        raise FileNotFoundError(f"{path}: not a run dir or beit_scale checkpoint folder (no {MANIFEST})")
    reason = verify(p, checksums=checksums)
    if reason:
        raise ValueError(f"{path}: checkpoint unusable: {reason}")
    return p


def consolidated_state_dict(path: str | Path, checksums: bool = False) -> tuple[dict, dict]:
    ckpt = resolve_checkpoint(path, checksums=checksums)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if manifest["zero_stage"] == 0:
        blob = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}
    else:
        from beit_scale.train.engine import fp32_state_dict_from_zero_checkpoint
        sd = fp32_state_dict_from_zero_checkpoint(ckpt.parent, tag=ckpt.name)
        sd = {k: v.float().contiguous() for k, v in sd.items()}
    # Buffers (e.g. relative_position_index) are not in DeepSpeed's fp32 partitions; the model rebuilds them.
    return sd, manifest


REPO = Path(__file__).resolve().parents[3]
SCRATCH = ("scratch", "none", "")

# Keys a source may carry that a classifier legitimately has no place for (beit.layernorm: the
# final norm of a transformers BEiT that pools the cls token, kept under its HF name).
_DROPPABLE_PREFIXES = ("lm_head.", "norm.", "beit.layernorm.")
_DROPPABLE_KEYS = ("mask_token",)
# Keys a fresh classifier may lack in the source: the new head, and fc_norm (a MIM model ends in
# `norm`, which mean-pooling fine-tuning replaces by a freshly initialised fc_norm).
_NEW_OK_PREFIXES = ("head.", "fc_norm.")


@dataclass
class InitReport:
    source: str
    kind: str                                   # run dir | checkpoint | safetensors (ours) | timm ...
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)  # model keys left at their fresh init
    unexpected: list = field(default_factory=list)  # source keys dropped
    notes: list = field(default_factory=list)

    def lines(self) -> list[str]:
        def short(keys):
            return ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "") if keys else "none"
        out = [f"init.from {self.source} [{self.kind}]: loaded {len(self.loaded)} tensors",
               f"  missing (fresh init): {short(self.missing)}",
               f"  dropped from the source: {short(self.unexpected)}"]
        out += [f"  {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "loaded": len(self.loaded),
                "missing": self.missing, "unexpected": self.unexpected, "notes": self.notes}


def read_state_dict(source: str | Path) -> tuple[dict, str]:
    """Load the tensors behind `source` (fp32, CPU) and say what kind of source it was."""
    p = Path(source).expanduser()
    if not p.exists():
        raise ConfigError(f"init.from={source}: no such file or directory. Give a pretraining run dir, a "
                          f"checkpoint folder, an exported .safetensors file, a timm BEiT weights file or "
                          f"a transformers BEiT directory (config.json + model.safetensors), "
                          f"or init.from=scratch")
    if p.is_dir():
        from beit_scale.models.hf import is_hf_dir
        if is_hf_dir(p):
            return _read_hf_dir(p, source)
        try:
            sd, manifest = consolidated_state_dict(p)
        except (FileNotFoundError, ValueError, RuntimeError, KeyError, OSError) as e:
            raise ConfigError(f"init.from={source}: cannot read weights from this folder: {e}") from None
        kind = f"{manifest.get('stage', '?')} checkpoint step {manifest.get('step')}"
        return sd, kind
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p))
        elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
            sd = unwrap_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        else:
            raise ConfigError(f"init.from={source}: unknown file type {suffix!r}; expected .safetensors, "
                              f".pth, .pt or .bin (or a run dir / checkpoint folder)")
    except ConfigError:
        raise
    except Exception as e:  # a truncated or foreign file: say so instead of a pickle traceback
        raise ConfigError(f"init.from={source}: cannot read this file ({type(e).__name__}: {e}); "
                          f"is it complete and a weights file?") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"init.from={source}: expected a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    timm = any("relative_position_bias_table" in k or k.startswith("rel_pos_bias.") for k in sd)
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, \
        ("timm state dict" if timm else "beit_scale state dict") + f" ({suffix[1:]})"


def _read_hf_dir(p: Path, source) -> tuple[dict, str]:
    """A transformers BEiT directory (exported by us or saved by transformers) in our names; its
    entries that have no place in our models keep their HF names, so the key report lists them."""
    from beit_scale.models.hf import from_hf, read_hf_dir
    try:
        hf, hf_sd = read_hf_dir(p)
        sd, unused = from_hf(hf_sd)
    except (ValueError, OSError, RuntimeError) as e:
        raise ConfigError(f"init.from={source}: cannot read this transformers directory: {e}") from None
    sd.update(unused)
    arch = ", ".join(hf.get("architectures") or ["BEiT"])
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, \
        f"transformers {arch} directory"


def pending_init(init_from, read: tuple | None) -> tuple | None:
    """(source, state dict, kind) for a task's build_model: what its preflight already read, else
    `init.from` read now (a task built without preflight, e.g. for an export), None for scratch."""
    if read is None and init_from is not None and str(init_from).strip().lower() not in SCRATCH:
        return (init_from, *read_state_dict(init_from))
    return read


def check_is_beit(sd: dict, source) -> None:
    need = ("patch_embed.proj.weight", "cls_token")
    if not all(k in sd for k in need) or not any(k.startswith("blocks.0.") for k in sd):
        sample = ", ".join(list(sd)[:5])
        raise ConfigError(f"init.from={source}: not a BEiT state dict (no {' / '.join(need)} / blocks.0.*; "
                          f"its first keys are: {sample})")


def load_init_weights(model: torch.nn.Module, source: str | Path, sd: dict | None = None,
                      kind: str | None = None, check_only: bool = False) -> InitReport:
    """Copy the weights of `source` into `model` (a BeitClassifier) and report what happened.

    `check_only`: run every check but copy nothing (preflight, on a meta-device model)."""
    from beit_scale.models.convert import adapt_state_dict_to, from_timm
    if sd is None:
        sd, kind = read_state_dict(source)
    sd = from_timm(sd)  # timm names -> ours; ours pass through unchanged
    check_is_beit(sd, source)
    mcfg = model.cfg
    try:
        adapted = adapt_state_dict_to(mcfg, sd, task="classify")
    except ValueError as e:
        raise ConfigError(f"init.from={source}: {e}") from None
    report = InitReport(str(source), kind or "state dict")
    want = model.state_dict()
    # What adapt_state_dict_to dropped, and whether each drop is one we expect.
    placed_from = set(adapted) | ({"shared_rel_pos.table"} if "shared_rel_pos.table" in sd else set())
    dropped = sorted(k for k in sd if k not in placed_from)
    bad_drops = []
    for k in dropped:
        if k in _DROPPABLE_KEYS or k.startswith(_DROPPABLE_PREFIXES):
            continue
        if k.startswith("head.") and k in want and tuple(want[k].shape) != tuple(sd[k].shape):
            continue
        if k.startswith("head.") and "head.weight" not in want:
            continue
        bad_drops.append(k)
    if bad_drops:
        raise ConfigError(f"init.from={source}: the source has weights the model {mcfg.name!r} has no place "
                          f"for: {bad_drops[:8]}. Is model.name (and layer_scale_init / rel_pos_bias) "
                          f"the one that was pretrained?")
    missing = sorted(k for k in want if k not in adapted)
    bad_missing = [k for k in missing if not k.startswith(_NEW_OK_PREFIXES)]
    if bad_missing:
        raise ConfigError(f"init.from={source}: the source lacks backbone weights of {mcfg.name!r}: "
                          f"{bad_missing[:8]}. Was it pretrained with another model.name?")
    if not check_only:
        result = model.load_state_dict(adapted, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
    report.loaded, report.missing, report.unexpected = sorted(adapted), missing, dropped
    if "shared_rel_pos.table" in sd and mcfg.rel_pos_bias == "layer":
        report.notes.append(f"shared relative position bias copied into each of the {mcfg.depth} blocks")
    if "mask_token" in sd:
        report.notes.append("MIM head, final norm and [MASK] token dropped")
    src_tables = [v for k, v in sd.items() if k.endswith("rel_pos.table")]
    if src_tables:
        from beit_scale.models.beit import num_relative_distances
        if src_tables[0].shape[0] != num_relative_distances(mcfg.grid_size):
            report.notes.append(f"relative position tables resized to the {mcfg.grid_size} patch grid "
                                f"({mcfg.img_size}px)")
    if "head.weight" in sd and "head.weight" in want and tuple(sd["head.weight"].shape) != tuple(want["head.weight"].shape):
        report.notes.append(f"new classifier head: {sd['head.weight'].shape[0]} -> {want['head.weight'].shape[0]} classes")
    return report


def default_init_source(model_name: str) -> Path | None:
    """The default pretraining run dir (REPO/runs/mim_<model>) if it holds a complete checkpoint."""
    run = REPO / "runs" / f"mim_{model_name}"
    ck = run / "checkpoints"
    if ck.is_dir() and any((c / "COMPLETE").exists() for c in ck.iterdir() if c.is_dir()):
        return run
    return None
