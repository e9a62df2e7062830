"""Fine-tuning (stage "classify"): BeitClassifier on an ImageFolder, initialised from pretraining.

Two public pieces:

* `load_init_weights(model, source) -> InitReport`: put weights from `init.from` into a freshly
  built classifier.  `source` is a run dir (its newest valid checkpoint), a checkpoint folder,
  a safetensors file we exported, or a timm BEiT state dict (.safetensors / .pth / .bin).  The
  MIM head and [MASK] token are dropped, a shared relative-position table is copied into every
  block, tables and absolute position embeddings are resized when the resolution differs, and
  the classifier head is re-initialised when the class count differs.  Anything else that does
  not fit (missing backbone weights, a shape mismatch, a file that is not BEiT) is a ConfigError.
* `ClassifyTask`: data (train/val splits), objective (mixup/cutmix, label smoothing via timm),
  optional weight EMA, evaluation (top-1/top-5/loss over the held-out split), and the best
  weights kept at `run_dir/best/model.safetensors` (+ best.json) outside the checkpoint folder,
  so checkpoint retention never touches them.

Layer-wise lr decay needs nothing here: `optim.param_groups` reads `model.layer_id`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from beit_scale.config import ConfigError, ExperimentCfg
from beit_scale.dist.env import say_rank0 as _say
from beit_scale.models.convert import unwrap_state_dict
from beit_scale.train.tasks import Task, _model_dtype, count_flops, device_images

REPO = Path(__file__).resolve().parents[2]
SCRATCH = ("scratch", "none", "")

# Keys a source may carry that a classifier legitimately has no place for.
_DROPPABLE_PREFIXES = ("lm_head.", "norm.")
_DROPPABLE_KEYS = ("mask_token",)
# Keys a fresh classifier may lack in the source: the new head, and fc_norm (a MIM model ends in
# `norm`, which mean-pooling fine-tuning replaces by a freshly initialised fc_norm).
_NEW_OK_PREFIXES = ("head.", "fc_norm.")


# ----------------------------------------------------------------------------- init.from

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
                          f"checkpoint folder, an exported .safetensors file or a timm BEiT weights file, "
                          f"or init.from=scratch")
    if p.is_dir():
        from beit_scale.train.checkpoint_reader import consolidated_state_dict
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


def _check_is_beit(sd: dict, source) -> None:
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
    _check_is_beit(sd, source)
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


# ----------------------------------------------------------------------------- the task

class ClassifyTask(Task):
    """Image classification fine-tuning (and linear probing) of a BEiT backbone."""
    name = "classify"

    def __init__(self, cfg: ExperimentCfg):
        super().__init__(cfg)
        self._init = None                     # (source, state dict, kind) read in preflight
        self.init_report: InitReport | None = None
        self.mixup = None

    # -- config checks, before any process group
    def model_kwargs(self) -> dict:
        m, f = self.cfg.model, self.cfg.finetune
        kw = {"num_classes": m.num_classes, "img_size": m.img_size}
        if m.drop_path is not None:
            kw["drop_path_rate"] = m.drop_path
        if f.linear_probe:
            kw["drop_path_rate"] = 0.0       # a frozen backbone: no stochastic depth noise on its features
        if m.layer_scale_init is not None:
            kw["layer_scale_init"] = m.layer_scale_init
        if m.rel_pos_bias is not None:
            kw["rel_pos_bias"] = m.rel_pos_bias
        return kw

    def init_source(self) -> str | None:
        src = self.cfg.init.from_
        if src is None:
            found = default_init_source(self.cfg.model.name)
            if found is None:
                _say(f"init.from not set and no default pretraining run at {REPO / 'runs' / ('mim_' + self.cfg.model.name)}: "
                     f"fine-tuning FROM SCRATCH (random init)")
                return None
            _say(f"init.from not set: using the default pretraining run {found} "
                 f"(set init.from=scratch to train from random init)")
            return str(found)
        if str(src).strip().lower() in SCRATCH:
            _say("init.from=scratch: fine-tuning FROM SCRATCH (random init)")
            return None
        return src

    def preflight(self) -> None:
        super().preflight()
        cfg, f = self.cfg, self.cfg.finetune
        from beit_scale.models.zoo import get_config
        try:
            get_config(cfg.model.name, **self.model_kwargs())
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model.name={cfg.model.name}: {e}") from None
        if cfg.model.img_size != cfg.data.input_size:
            raise ConfigError(f"model.img_size={cfg.model.img_size} but data.input_size={cfg.data.input_size}; "
                              f"set both (e.g. --set model.img_size=384 --set data.input_size=384)")
        classes = self.folder(cfg.data.train_split).classes
        if len(classes) != cfg.model.num_classes:
            raise ConfigError(f"the training set has {len(classes)} classes but model.num_classes="
                              f"{cfg.model.num_classes}; set --set model.num_classes={len(classes)}")
        zero = int(((self.ds_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)
        if f.ema and zero == 3:
            raise ConfigError("finetune.ema=true needs the full weights on every rank, which ZeRO 3 does "
                              "not keep; use ds_configs/zero2.json (or zero0/1) with EMA, or turn EMA off")
        src = self.init_source()
        if src is not None:
            sd, kind = read_state_dict(src)
            # Dry run on the meta device: every mismatch surfaces here, before a process group exists.
            from beit_scale.models.zoo import build_model
            with torch.device("meta"):
                probe = build_model(cfg.model.name, task="classify", **self.model_kwargs())
            _check_is_beit(sd, src)
            self._init = (src, sd, kind)
            load_init_weights(probe, src, sd=sd, kind=kind, check_only=True)

    # -- model
    def _plain_model(self):
        from beit_scale.models.zoo import build_model
        return build_model(self.cfg.model.name, task="classify", **self.model_kwargs())

    def build_model(self):
        model = self._plain_model()
        if self._init is None and self.cfg.init.from_ is not None and \
                str(self.cfg.init.from_).lower() not in SCRATCH:
            src = self.cfg.init.from_
            self._init = (src, *read_state_dict(src))
        if self._init is not None:
            src, sd, kind = self._init
            self.init_report = load_init_weights(model, src, sd=sd, kind=kind)
            for line in self.init_report.lines():
                _say(line)
            self._init = None  # free the source tensors
        if self.cfg.finetune.linear_probe:
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(("head.", "fc_norm.")))
            _say("linear probe: backbone frozen, training fc_norm + head only")
        return model

    def prepare(self, device):
        super().prepare(device)
        f = self.cfg.finetune
        if f.mixup > 0 or f.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                               switch_prob=f.mixup_switch_prob, mode="batch",
                               label_smoothing=f.label_smoothing, num_classes=self.cfg.model.num_classes)

    def extra_state(self):
        return {"init": self.init_report.to_dict() if self.init_report else None}

    def callbacks(self):
        """The weight EMA (finetune.ema) and the best-weights keeper (run_dir/best/)."""
        from beit_scale.config import to_dict
        from beit_scale.train.callbacks import BestWeights, EMACallback
        cbs = []
        if self.cfg.finetune.ema:
            cbs.append(EMACallback(self.cfg.finetune.ema_decay, self.score, say=_say))
        if self.run_dir is not None:
            cbs.append(BestWeights(self.run_dir, "val_top1",
                                   {"model": self.cfg.model.name, "config": json.dumps(to_dict(self.cfg))}))
        return cbs

    # -- data
    def train_dataset(self):
        from beit_scale.data.datasets import ClassifyDataset
        from beit_scale.data.transforms import ClassifyTransform
        d = self.cfg.data
        return ClassifyDataset(self.folder(d.train_split),
                               ClassifyTransform(train=True, size=d.input_size, scale=(d.crop_min_scale, 1.0),
                                                 rand_augment=self.cfg.finetune.rand_augment))

    def eval_dataset(self):
        from beit_scale.data.datasets import ClassifyDataset
        from beit_scale.data.transforms import ClassifyTransform
        d = self.cfg.data
        return ClassifyDataset(self.folder(d.val_split), ClassifyTransform(train=False, size=d.input_size))

    # -- objective
    def step(self, engine, batch, step):
        img, target = batch
        # uint8 from the loader -> normalised float32 on the device; mixup/cutmix mix those
        # float32 images (as before), the cast to the model's dtype comes after.
        img = device_images(img, self.device, torch.float32, normalize=True)
        target = target.to(self.device, non_blocking=True)
        metrics = {}
        if self.mixup is not None:
            img, soft = self.mixup(img, target)
            logits = engine(img.to(_model_dtype(engine.module))).float()
            loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = engine(img.to(_model_dtype(engine.module))).float()
            loss = F.cross_entropy(logits, target, label_smoothing=self.cfg.finetune.label_smoothing)
            metrics["train_top1"] = (logits.detach().argmax(-1) == target).float().mean()
        return loss, metrics

    @staticmethod
    def _scores(logits, target, prefix=""):
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk == target[:, None]
        return {f"{prefix}correct1": hit[:, 0].float().sum(), f"{prefix}correct5": hit.any(-1).float().sum(),
                f"{prefix}loss_sum": F.cross_entropy(logits, target, reduction="sum")}

    def score(self, model, batch, n_valid: int, dtype: torch.dtype, prefix: str = "") -> dict:
        """Top-1/top-5/loss sums of `model` on the valid rows.  The images are made in `dtype`
        (the trained model's) and cast to `model`'s, so the EMA (fp32) sees what the model saw."""
        img, target = batch
        img = device_images(img[:n_valid], self.device, dtype, normalize=True)
        target = target[:n_valid].to(self.device)
        return self._scores(model(img.to(_model_dtype(model))).float(), target, prefix)

    def eval_batch(self, engine, batch, n_valid):
        out = self.score(engine, batch, n_valid, _model_dtype(engine.module))
        out["count"] = torch.tensor(float(n_valid), device=self.device)
        return out

    def finish_eval(self, sums):
        n = max(float(sums["count"]), 1.0)
        res = {"val_top1": float(sums["correct1"]) / n, "val_top5": float(sums["correct5"]) / n,
               "val_loss": float(sums["loss_sum"]) / n}
        if "ema_correct1" in sums:
            res.update(val_top1_ema=float(sums["ema_correct1"]) / n, val_top5_ema=float(sums["ema_correct5"]) / n,
                       val_loss_ema=float(sums["ema_loss_sum"]) / n)
        return res

    def flops_per_sample(self):
        s = self.cfg.data.input_size
        with torch.device("meta"):
            model = self._plain_model()
            x = torch.zeros(1, 3, s, s)
        fwd = count_flops(lambda: model(x))
        return None if fwd is None else 3 * fwd

    def summary(self, m):
        line = f"classification on held-out images: top-1 {m['val_top1']:.4f}, top-5 {m['val_top5']:.4f}, " \
               f"loss {m['val_loss']:.4f}"
        if "val_top1_ema" in m:
            line += f" | EMA top-1 {m['val_top1_ema']:.4f}"
        if "best_top1" in m:
            line += f" | best top-1 {m['best_top1']:.4f} at step {m['best_step']} " \
                    f"({self.run_dir / 'best' / 'model.safetensors'})"
        return [line]
