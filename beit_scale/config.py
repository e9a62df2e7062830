"""Typed experiment configuration.

One dataclass tree describes an experiment (model, data, optimisation, schedule, checkpointing).
YAML files fill it and `--set dotted.key=value` overrides it; unknown keys, wrong types and
inconsistent values raise `ConfigError` *before* any process group starts.

Parallelism and precision live in the DeepSpeed JSON (ds_configs/); `merge_deepspeed_config`
fills the batch fields of that JSON from the experiment and refuses values set differently in
both places instead of silently picking one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


@dataclass
class ModelCfg:
    name: str = "beit_tiny"
    drop_path: Optional[float] = None          # None: the zoo default
    layer_scale_init: Optional[float] = None   # None: the zoo default (0.1 base, 1e-5 large+)
    rel_pos_bias: Optional[str] = None         # layer | shared | none; None: task default
    img_size: int = 224
    num_classes: int = 10


@dataclass
class DataCfg:
    path: Optional[str] = None                 # ImageFolder root; None: the embedded dataset
    num_workers: int = 2
    input_size: int = 224                      # backbone view
    second_input_size: int = 112               # tokenizer view
    num_mask_patches: int = 75
    min_mask_patches: int = 16
    crop_min_scale: float = 0.08
    color_jitter: float = 0.4
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class TokenizerCfg:
    checkpoint: Optional[str] = None           # a trained tokenizer (.safetensors); None: train one
    vocab_size: int = 8192
    hidden_dim: int = 64
    temperature_start: float = 1.0
    temperature_end: float = 0.0625
    kl_weight: float = 1e-3


@dataclass
class TrainCfg:
    max_steps: int = 300
    global_batch: int = 32
    micro_batch: int = 16
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0                        # 0: only at the end
    eval_batches: int = 8
    act_ckpt: str = "none"                     # none | all | every_N  (e.g. every_2)
    act_ckpt_impl: str = "torch"               # torch | deepspeed
    image_log_every: int = 100
    stop_at_step: int = 0                      # >0: checkpoint and stop there (schedule still spans max_steps)
    cpu_mem_profile_steps: int = 0             # CPU: track tensor memory (torch profiler) for the first N steps
    sync_every: int = 10                       # steps between the ranks' agreement on signals + checkpoint clock
    dist_timeout_min: float = 60.0             # process-group timeout: how long a collective waits for a late rank


@dataclass
class OptimCfg:
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 20
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0                   # 1.0 = off; fine-tuning uses 0.65 (base) / 0.75 (large)
    clip_grad: Optional[float] = None          # if set, must equal the DeepSpeed file's gradient_clipping


@dataclass
class CheckpointCfg:
    every_steps: int = 0                       # 0: off
    every_minutes: float = 0.0                 # 0: off
    keep_last: int = 2
    keep_every: int = 0                        # additionally keep every K-th step (0: off)
    resume: str = "auto"                       # auto | none | PATH
    overwrite: bool = False                    # allow resume=none in a run dir that has checkpoints
    background_finalize: bool = True           # periodic saves: CRC + manifest + COMPLETE on a thread


@dataclass
class InitCfg:
    # "from" is a Python keyword; YAML/--set use `init.from`, mapped to `from_`.
    from_: Optional[str] = None                # run dir | checkpoint folder | .safetensors | timm file


@dataclass
class FinetuneCfg:
    # Classification fine-tuning only (stage classify); 0 / false switches each one off.
    mixup: float = 0.0                         # mixup alpha (paper recipe: 0.8)
    cutmix: float = 0.0                        # cutmix alpha (paper recipe: 1.0)
    mixup_prob: float = 1.0                    # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5             # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.0               # paper recipe: 0.1
    ema: bool = False                          # keep an exponential moving average of the weights (ZeRO 0-2)
    ema_decay: float = 0.9999
    linear_probe: bool = False                 # freeze the backbone; train fc_norm + head only
    rand_augment: Optional[str] = None         # timm RandAugment string, e.g. rand-m9-mstd0.5-inc1


@dataclass
class ExperimentCfg:
    stage: str = "mim"                         # tokenizer | mim | classify
    precision: Optional[str] = None            # fp32 | fp16 | bf16; None: the DeepSpeed file decides
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    tokenizer: TokenizerCfg = field(default_factory=TokenizerCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    init: InitCfg = field(default_factory=InitCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)


STAGES = ("tokenizer", "mim", "classify")
PRECISIONS = ("fp32", "fp16", "bf16")
_KEY_ALIASES = {"from": "from_"}


# ----------------------------------------------------------------------------- building

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotation; raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")
                             and args[0] is not str):
            return None
        if args[0] is str and value is None:
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typ is tuple or origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, float, key) for v in value)
    return value


def _fill(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for raw_key, value in data.items():
        key = _KEY_ALIASES.get(raw_key, raw_key)
        dotted = f"{prefix}{raw_key}"
        if key not in types_:
            valid = ", ".join(sorted(k.rstrip("_") for k in types_))
            raise ConfigError(f"unknown config key '{dotted}'. Valid keys here: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, types_[key], dotted))


def parse_overrides(items: list[str]) -> dict:
    """`["a.b=1", "c=x"]` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value (e.g. --set train.max_steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is a value, not a section")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment config {p} does not exist (pass --config PATH to an existing YAML file)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    # `base:` lets a YAML be a small delta over another YAML (relative to this file).
    base = data.pop("base", None)
    if base:
        merged = load_yaml(p.parent / base)
        _deep_update(merged, data)
        data = merged
    return data


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def build_config(stage: str, yaml_path: str | None = None, overrides: list[str] | None = None,
                 defaults: dict | None = None) -> tuple[ExperimentCfg, dict, dict]:
    """Embedded defaults for `stage` <- YAML <- --set.  Returns (cfg, yaml_dict, set_dict).

    The raw YAML and --set dicts are returned too: precision provenance matters (a command-line
    override wins over files, two files disagreeing is an error).
    """
    cfg = ExperimentCfg(stage=stage)
    if defaults:
        _fill(cfg, copy.deepcopy(defaults))
    file_dict = load_yaml(yaml_path) if yaml_path else {}
    set_dict = parse_overrides(overrides or [])
    _fill(cfg, copy.deepcopy(file_dict))
    _fill(cfg, copy.deepcopy(set_dict))
    validate(cfg)
    return cfg, file_dict, set_dict


def validate(cfg: ExperimentCfg, world_size: int | None = None) -> None:
    t, o, d, c = cfg.train, cfg.optim, cfg.data, cfg.checkpoint
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r}: must be one of {STAGES}")
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}: must be one of {PRECISIONS}")
    for name, val in (("train.max_steps", t.max_steps), ("train.global_batch", t.global_batch),
                      ("train.micro_batch", t.micro_batch), ("train.log_every", t.log_every)):
        if val <= 0:
            raise ConfigError(f"{name}={val}: must be positive")
    if t.sync_every <= 0:
        raise ConfigError(f"train.sync_every={t.sync_every}: must be positive (steps between the ranks' "
                          f"check for stop signals and the checkpoint clock)")
    if t.dist_timeout_min <= 0:
        raise ConfigError(f"train.dist_timeout_min={t.dist_timeout_min}: must be positive (minutes a collective "
                          f"waits for a late rank; 60 suits 64 ranks scanning ImageNet on a shared filesystem)")
    if t.cpu_mem_profile_steps < 0:
        raise ConfigError(f"train.cpu_mem_profile_steps={t.cpu_mem_profile_steps}: must be >= 0 (0 = off)")
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch={t.global_batch} is not a multiple of "
                          f"train.micro_batch={t.micro_batch}")
    if world_size is not None and t.global_batch % (t.micro_batch * world_size):
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch x world size "
            f"= {t.micro_batch} x {world_size}; choose global_batch as a multiple of "
            f"{t.micro_batch * world_size} or change micro_batch / the number of ranks")
    if o.lr <= 0 or o.min_lr < 0 or o.weight_decay < 0 or o.warmup_steps < 0:
        raise ConfigError("optim.lr must be > 0; optim.min_lr, weight_decay, warmup_steps >= 0")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay={o.layer_decay}: must be in (0, 1]")
    # The upper bound depends on the model's patch size (16, or 14 for the giant), which lives in
    # the zoo above this layer: MIMTask.check_geometry checks it, with the tokenizer grid.
    if cfg.stage == "mim" and d.num_mask_patches < 0:
        raise ConfigError(f"data.num_mask_patches={d.num_mask_patches}: must be >= 0")
    if c.keep_last < 2:
        raise ConfigError(f"checkpoint.keep_last={c.keep_last}: keep at least 2 so a crash during a "
                          f"save never leaves you without a complete checkpoint")
    if c.every_steps < 0 or c.every_minutes < 0 or c.keep_every < 0:
        raise ConfigError("checkpoint.every_steps / every_minutes / keep_every must be >= 0")
    policy = t.act_ckpt
    if policy not in ("none", "all") and not (policy.startswith("every_") and policy[6:].isdigit()
                                               and int(policy[6:]) > 0):
        raise ConfigError(f"train.act_ckpt={policy!r}: use none, all, or every_N (e.g. every_2)")
    if t.act_ckpt_impl not in ("torch", "deepspeed"):
        raise ConfigError(f"train.act_ckpt_impl={t.act_ckpt_impl!r}: use torch or deepspeed")
    if d.num_workers < 0:
        raise ConfigError("data.num_workers must be >= 0")
    f = cfg.finetune
    if f.mixup < 0 or f.cutmix < 0 or not 0 <= f.label_smoothing < 1 or not 0 <= f.mixup_prob <= 1:
        raise ConfigError("finetune.mixup / cutmix must be >= 0, finetune.label_smoothing in [0, 1), "
                          "finetune.mixup_prob in [0, 1]")
    if not 0 < f.ema_decay < 1:
        raise ConfigError(f"finetune.ema_decay={f.ema_decay}: must be in (0, 1)")


def to_dict(cfg: ExperimentCfg) -> dict:
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name.rstrip("_"): conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple):
            return list(x)
        return x
    return conv(cfg)


def from_dict(data: dict) -> ExperimentCfg:
    cfg = ExperimentCfg(stage=data.get("stage", "mim"))
    _fill(cfg, copy.deepcopy(data))
    return cfg


def dump_yaml(cfg: ExperimentCfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- DeepSpeed JSON


def load_deepspeed_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} does not exist (pass --deepspeed_config ds_configs/zero2.json "
                          f"or another file from ds_configs/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None


def file_precision(ds: dict) -> str:
    if ds.get("fp16", {}).get("enabled", False):
        return "fp16"
    if ds.get("bf16", {}).get("enabled", False):
        return "bf16"
    return "fp32"


def merge_deepspeed_config(cfg: ExperimentCfg, ds: dict, world_size: int, yaml_dict: dict,
                           set_dict: dict) -> dict:
    """Fill the batch fields from the experiment and resolve precision; conflicts are errors."""
    ds = copy.deepcopy(ds)
    t = cfg.train
    validate(cfg, world_size)
    accum = t.global_batch // (t.micro_batch * world_size)
    want = {"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": accum}
    for key, value in want.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(
                f"DeepSpeed config sets {key}={ds[key]} but the experiment implies {value} "
                f"(train.global_batch={t.global_batch}, train.micro_batch={t.micro_batch}, world size {world_size}). "
                f"Batch sizes belong in the experiment YAML: remove {key} from the DeepSpeed file.")
        ds[key] = value

    clip = cfg.optim.clip_grad
    if clip is not None:
        have = ds.get("gradient_clipping")
        if have is not None and float(have) != float(clip):
            raise ConfigError(f"optim.clip_grad={clip} disagrees with gradient_clipping={have} in the "
                              f"DeepSpeed file; set it in one place")
        ds["gradient_clipping"] = clip

    # Precision: --set wins; a YAML value that disagrees with the JSON is an error.
    in_file = file_precision(ds)
    if "precision" in set_dict:
        wanted = cfg.precision
    elif "precision" in yaml_dict and cfg.precision != in_file:
        raise ConfigError(f"the experiment YAML says precision={cfg.precision} but the DeepSpeed file "
                          f"says {in_file}; make them agree, or override on the command line with "
                          f"--set precision=...")
    else:
        wanted = in_file
    set_precision(ds, wanted)
    return ds


def set_precision(ds: dict, precision: str) -> None:
    fp16 = ds.setdefault("fp16", {})
    bf16 = ds.setdefault("bf16", {})
    fp16["enabled"] = precision == "fp16"
    bf16["enabled"] = precision == "bf16"
