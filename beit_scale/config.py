"""Typed experiment configuration.

One tree of pydantic models describes an experiment (model, data, optimisation, schedule,
checkpointing).  YAML files fill it and `--set dotted.key=value` overrides it; unknown keys, wrong
types and inconsistent values raise `ConfigError` *before* any process group starts.  Types, choices
(`Literal`) and bounds are declared on the fields; rules across fields are `model_validator`s; the
one rule that needs the world size is in `validate(cfg, world_size)`.  Assignments are validated
too (`cfg.precision = "fp8"` raises); rules across fields run at construction and in `validate`.

Parallelism and precision live in the DeepSpeed JSON (ds_configs/); `merge_deepspeed_config`
fills the batch fields of that JSON from the experiment and refuses values set differently in
both places instead of silently picking one.
"""
from __future__ import annotations

import copy
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


def _number(kind: str):
    """Pydantic's lax mode reads true/false as 1/0; a boolean where a number belongs is a mistake.
    For optional numbers, YAML's null and the words none/null (from --set) mean None."""
    def check(v):
        if isinstance(v, bool):
            raise PydanticCustomError(f"{kind}_type", "not a number")
        if kind == "optional" and isinstance(v, str) and v.strip().lower() in ("none", "null", "~"):
            return None
        return v
    return BeforeValidator(check)


Int = Annotated[int, _number("int")]
Float = Annotated[float, _number("float")]
OptFloat = Annotated[Optional[float], _number("optional")]
Beta = Annotated[float, _number("float"), Field(ge=0, lt=1)]
Stage = Literal["tokenizer", "mim", "classify", "segment"]
Precision = Literal["fp32", "fp16", "bf16"]
STAGES, PRECISIONS = typing.get_args(Stage), typing.get_args(Precision)


class _Section(BaseModel):
    # coerce_numbers_to_str: `--set model.name=123` or a numeric path is a string, as YAML meant it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              coerce_numbers_to_str=True)

    # An assignment raises ConfigError too, naming the key as YAML does (`cfg.train.max_steps = 0`:
    # train.max_steps).  (Not __init__: pydantic would then call it for every nested section.)
    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise _config_error(e, _SECTION_PATH.get(type(self), ())) from None


class ModelCfg(_Section):
    name: str = Field("beit_tiny", description="a zoo model (beit_scale/models/zoo.py); dvae for the tokenizer stage")
    drop_path: OptFloat = Field(None, ge=0, lt=1, description="stochastic depth rate; None: the zoo default")
    layer_scale_init: OptFloat = Field(None, ge=0, description="None: the zoo default (0.1 base, 1e-5 large+); "
                                                               "0: no layer scale")
    rel_pos_bias: Optional[Literal["layer", "shared", "none"]] = Field(None, description="None: the task default")
    img_size: Int = Field(224, gt=0)
    num_classes: Int = Field(10, gt=0)


class DataCfg(_Section):
    path: Optional[str] = Field(None, description="ImageFolder root; None: the embedded dataset")
    num_workers: Int = Field(2, ge=0)
    input_size: Int = Field(224, gt=0, description="backbone view")
    second_input_size: Int = Field(112, gt=0, description="tokenizer view")
    # The upper bound depends on the model's patch size (16, or 14 for the giant), which lives in
    # the zoo above this layer: MIMTask.check_geometry checks it, with the tokenizer grid.
    num_mask_patches: Int = Field(75, ge=0, description="masked patches per image, MIM only")
    min_mask_patches: Int = Field(16, ge=1, description="smallest masking block, MIM only")
    mask_mode: Literal["block", "random"] = Field("block", description="MIM masks: BEiT's blocks, or the same "
                                                                       "count of patches at random (ablation)")
    crop_min_scale: Float = Field(0.08, gt=0, le=1)
    color_jitter: Float = Field(0.4, ge=0)
    train_split: str = "train"
    val_split: str = "val"
    reduce_zero_label: bool = Field(False, description="segmentation: label 0 means 'other' (ADE20K): ignore it "
                                                       "and shift the rest down by one")
    # Input pipeline at scale (docs/data.md "ImageNet-scale input").
    format: Literal["folder", "shards"] = Field("folder", description="folder: <split>/<class>/<image>; shards: "
                                                "<split>/index.json + tars (python -m beit_scale.data.shards write)")
    index_cache: Optional[str] = Field(None, description="folder format: where the file list is cached with a "
                                                         "fingerprint; None: the run dir; 'off': list every start")
    max_unreadable_frac: Float = Field(0.01, ge=0, le=1, description="fail the run when more than this fraction "
                                                                     "of a split's files is unreadable")
    decode: Literal["cpu", "cuda"] = Field("cpu", description="cpu: workers decode and augment; cuda: workers "
                                           "ship JPEG bytes + drawn crop/flip/jitter, the GPU decodes (mim, "
                                           "classify; docs/data.md)")


class TokenizerCfg(_Section):
    checkpoint: Optional[str] = Field(None, description="a trained tokenizer (.safetensors); None: train one")
    vocab_size: Int = Field(8192, gt=0)
    hidden_dim: Int = Field(64, gt=0)
    temperature_start: Float = Field(1.0, gt=0)
    temperature_end: Float = Field(0.0625, gt=0)
    kl_weight: Float = Field(1e-3, ge=0)


class MimCfg(_Section):
    target: Literal["tokens", "pixels"] = Field("tokens", description="what MIM predicts at masked patches: the "
                                                "tokenizer's visual tokens, or their normalized pixels (ablation; "
                                                "no tokenizer)")


class TrainCfg(_Section):
    max_steps: Int = Field(300, gt=0)
    global_batch: Int = Field(32, gt=0)
    micro_batch: Int = Field(16, gt=0)
    seed: Int = 0
    log_every: Int = Field(10, gt=0)
    eval_every: Int = Field(0, ge=0, description="0: only at the end")
    eval_batches: Int = Field(8, ge=0, description="0: the whole validation split")
    act_ckpt: str = Field("none", description="activation checkpointing: none | all | every_N (e.g. every_2)")
    act_ckpt_impl: Literal["torch", "deepspeed"] = "torch"
    image_log_every: Int = Field(100, ge=0)
    stop_at_step: Int = Field(0, ge=0, description=">0: checkpoint and stop there (schedule still spans max_steps)")
    cpu_mem_profile_steps: Int = Field(0, ge=0, description="CPU: track tensor memory with the torch profiler "
                                                            "for the first N steps; 0 = off")
    sync_every: Int = Field(10, gt=0, description="steps between the ranks' check for stop signals and the "
                                                  "checkpoint clock")
    dist_timeout_min: Float = Field(60.0, gt=0, description="minutes a collective waits for a late rank; 60 suits "
                                                            "64 ranks scanning ImageNet on a shared filesystem")

    @field_validator("act_ckpt")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in ("none", "all") and not (v.startswith("every_") and v[6:].isdigit() and int(v[6:]) > 0):
            raise ValueError(f"train.act_ckpt={v!r}: use none, all, or every_N (e.g. every_2)")
        return v


class OptimCfg(_Section):
    lr: Float = Field(1.5e-3, gt=0)
    min_lr: Float = Field(1e-5, ge=0)
    weight_decay: Float = Field(0.05, ge=0)
    warmup_steps: Int = Field(20, ge=0)
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    eps: Float = Field(1e-8, gt=0)
    layer_decay: Float = Field(1.0, gt=0, le=1, description="1.0 = off; fine-tuning uses 0.65 (base) / 0.75 (large)")
    clip_grad: OptFloat = Field(None, ge=0, description="if set, must equal the DeepSpeed file's gradient_clipping")
    schedule: Literal["cosine", "poly"] = Field("cosine", description="after warm-up: cosine to min_lr, or poly "
                                                "(power 1: linear to min_lr; the segmentation recipe)")


class CheckpointCfg(_Section):
    every_steps: Int = Field(0, ge=0, description="0: off")
    every_minutes: Float = Field(0.0, ge=0, description="0: off")
    keep_last: Int = Field(2, ge=2, description="keep at least 2 so a crash during a save never leaves you without "
                                                "a complete checkpoint")
    keep_every: Int = Field(0, ge=0, description="additionally keep every K-th step (0: off)")
    resume: str = Field("auto", description="auto | none | PATH")
    overwrite: bool = Field(False, description="allow resume=none in a run dir that has checkpoints")
    background_finalize: bool = Field(True, description="periodic saves: CRC + manifest + COMPLETE on a thread")


class GuardCfg(_Section):
    # The divergence guard (beit_scale/train/guard.py; README "Divergence guard").
    enabled: bool = Field(True, description="detect NaN, fp16 skip storms and loss spikes; roll back and go on")
    warmup_steps: Int = Field(200, ge=0, description="spike and skip-storm checks start after this step")
    loss_window: Int = Field(100, ge=2, description="steps whose median loss a spike is measured against")
    spike_steps: Int = Field(5, ge=1, description="a spike: the mean loss of the last N steps ...")
    spike_factor: Float = Field(2.0, gt=1, description="... above this factor x the running median")
    grad_spike_factor: OptFloat = Field(None, gt=1, description="the same test on the grad norm; None: off")
    skip_window: Int = Field(50, ge=1, description="fp16: a skip storm is more than max_skips skipped steps ...")
    max_skips: Int = Field(10, ge=0, description="... within skip_window steps")
    suspect_steps: Int = Field(20, ge=1, description="checkpoints of the last N steps before a detection are not "
                                                     "rollback targets (retention keeps an older one)")
    max_rollbacks: Int = Field(3, ge=0, description="rollbacks allowed within rollback_period steps; past it: "
                                                    "diagnostic checkpoint, report, exit status 5")
    rollback_period: Int = Field(1000, gt=0)
    lr_factor: Float = Field(1.0, gt=0, le=1, description="after a rollback, lr x this factor ...")
    lr_factor_steps: Int = Field(0, ge=0, description="... for this many steps (0: off)")
    inject: Optional[str] = Field(None, description="fault injection for tests and drills (off): "
                                                    "KIND@STEP[/RANK][xFACTOR],... KIND nan | grad | spike")


class InitCfg(_Section):
    # "from" is a Python keyword: YAML/--set/to_dict use `init.from`, Python code `cfg.init.from_`.
    from_: Optional[str] = Field(None, alias="from",
                                 description="run dir | checkpoint folder | .safetensors | timm file")


class FinetuneCfg(_Section):
    # Classification fine-tuning only (stage classify); 0 / false switches each one off.
    mixup: Float = Field(0.0, ge=0, description="mixup alpha; paper recipe: 0.8")
    cutmix: Float = Field(0.0, ge=0, description="cutmix alpha; paper recipe: 1.0")
    mixup_prob: Float = Field(1.0, ge=0, le=1, description="probability of mixing a batch at all")
    mixup_switch_prob: Float = Field(0.5, ge=0, le=1,
                                     description="probability of cutmix instead of mixup when both are on")
    label_smoothing: Float = Field(0.0, ge=0, lt=1, description="paper recipe: 0.1")
    ema: bool = Field(False, description="keep an exponential moving average of the weights (ZeRO 0-2)")
    ema_decay: Float = Field(0.9999, gt=0, lt=1)
    linear_probe: bool = Field(False, description="freeze the backbone; train fc_norm + head only")
    rand_augment: Optional[str] = Field(None, description="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1")


class SegmentCfg(_Section):
    # Semantic segmentation only (stage segment). The crop is model.img_size.
    decoder: Literal["upernet", "pup"] = Field("upernet", description="UperNet (the official numbers) or "
                                               "SETR-PUP (the paper's description)")
    channels: Int = Field(512, gt=0, description="decoder width")
    aux_head: bool = Field(True, description="auxiliary FCN head on the stride-16 level (training only)")
    aux_weight: Float = Field(0.4, ge=0)
    aux_channels: Int = Field(256, gt=0)
    layout: Literal["auto", "ade20k", "folder"] = Field("auto", description="ade20k: images/ + annotations/; "
                                                        "folder: <split>/ + masks/<split>/")
    ratio_range: tuple[Float, Float] = Field((0.5, 2.0), description="random resize ratio of the train scale")
    cat_max_ratio: Float = Field(0.75, gt=0, le=1, description="random crops: max share of one class")
    photometric: bool = True
    eval_mode: Literal["slide", "whole"] = "slide"
    eval_stride: Int = Field(0, ge=0, description="sliding-window stride; 0: 2/3 of the crop (341 at 512)")
    out_indices: Optional[list[Int]] = Field(None, description="UperNet: the 4 blocks (0-based) it reads; None: "
                                             "evenly spaced (official: [3, 5, 7, 11] Base, [7, 11, 15, 23] Large)")
    num_images: Int = Field(4, ge=0, description="images in the prediction overlays (tensorboard, final PNG)")


class ExperimentCfg(_Section):
    stage: Stage = "mim"
    precision: Optional[Precision] = Field(None, description="None: the DeepSpeed file decides")
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    tokenizer: TokenizerCfg = Field(default_factory=TokenizerCfg)
    mim: MimCfg = Field(default_factory=MimCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    checkpoint: CheckpointCfg = Field(default_factory=CheckpointCfg)
    guard: GuardCfg = Field(default_factory=GuardCfg)
    init: InitCfg = Field(default_factory=InitCfg)
    finetune: FinetuneCfg = Field(default_factory=FinetuneCfg)
    segment: SegmentCfg = Field(default_factory=SegmentCfg)

    # Rules across fields live here, not on TrainCfg: run.fit_embedded_batch assigns
    # `t.global_batch, t.micro_batch = ...` one at a time, and the state in between may break them.
    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentCfg":
        t, f = self.train, self.finetune
        problems = []
        if t.global_batch % t.micro_batch:
            problems.append(f"train.global_batch={t.global_batch} is not a multiple of "
                            f"train.micro_batch={t.micro_batch}")
        if self.stage == "mim" and self.mim.target == "pixels" and self.tokenizer.checkpoint:
            problems.append(f"mim.target=pixels regresses pixels and uses no tokenizer, but tokenizer.checkpoint="
                            f"{self.tokenizer.checkpoint} is set; remove it, or use mim.target=tokens")
        if self.stage == "classify" and (f.mixup > 0 or f.cutmix > 0) and t.micro_batch % 2:
            problems.append(f"mixup/cutmix mix each sample with its mirror in the batch and need an even "
                            f"train.micro_batch (got {t.micro_batch})")
        if self.stage == "segment" and self.model.num_classes > 255:
            problems.append(f"model.num_classes={self.model.num_classes}: segmentation labels are 8-bit "
                            f"(255 = ignored), so at most 255 classes")
        if self.segment.ratio_range[0] > self.segment.ratio_range[1]:
            problems.append(f"segment.ratio_range={list(self.segment.ratio_range)} must be [low, high]")
        if problems:
            raise ValueError("\n".join(problems))
        return self


_SECTION_PATH = {info.annotation: (key,) for key, info in ExperimentCfg.model_fields.items()
                 if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}


# ----------------------------------------------------------------------------- errors

_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string",
             "tuple": "a list", "list": "a list", "model": "a mapping of keys", "dict": "a mapping of keys"}


def _fields(cls) -> dict:
    """The keys of a section as YAML spells them (`from`, not `from_`) -> FieldInfo."""
    return {info.alias or name: info for name, info in cls.model_fields.items()}


def _lookup(loc: tuple) -> tuple[Any, Any]:
    """(the section class holding the last key of `loc`, that key's FieldInfo); None where none."""
    cls, info = ExperimentCfg, None
    for i, part in enumerate(loc):
        if i:
            ann = getattr(info, "annotation", None)
            cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        info = (_fields(cls).get(part) or cls.model_fields.get(part)) if cls and isinstance(part, str) else None
    return cls, info


def _bounds(info, ctx: dict) -> str:
    """`> 0`, `>= 2`, `in (0, 1]` from a field's declared bounds (else from the error's context)."""
    b = {k: v for m in getattr(info, "metadata", ()) for k in ("gt", "ge", "lt", "le")
         if (v := getattr(m, k, None)) is not None} or ctx
    lo = f"({b['gt']:g}" if "gt" in b else f"[{b['ge']:g}" if "ge" in b else None
    hi = f"{b['lt']:g})" if "lt" in b else f"{b['le']:g}]" if "le" in b else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if b.get("gt") == 0 and len(b) == 1:
        return "positive"
    return next(f"{op} {b[k]:g}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in b)


def _explain(err: dict) -> str:
    """One line for one pydantic error, naming the dotted key and what it accepts."""
    loc, kind, value = err["loc"], err["type"], err.get("input")
    key = ".".join(str(p) for p in loc if isinstance(p, str)) + "".join(f"[{p}]" for p in loc if isinstance(p, int))
    if kind in ("extra_forbidden", "no_such_attribute"):
        cls, _ = _lookup(loc)
        return f"unknown config key '{key}'. Valid keys here: {', '.join(sorted(_fields(cls))) if cls else '?'}"
    if kind in ("value_error", "assertion_error"):  # our validators' messages name their keys
        msg = str(err["ctx"]["error"])
        return msg if not key or key in msg else f"{key}: {msg}"
    if kind == "literal_error":
        return f"{key}={value!r}: must be {err['ctx']['expected']}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        _, info = _lookup(loc)
        hint = f" ({info.description})" if info is not None and info.description else ""
        return f"{key}={value}: must be {_bounds(info, err['ctx'])}{hint}"
    if kind in ("too_long", "too_short", "missing"):  # every key has a default: only a tuple misses a value
        loc = loc[:-1] if kind == "missing" else loc
        n = len(typing.get_args(getattr(_lookup(loc)[1], "annotation", None)))
        return f"{'.'.join(map(str, loc))}: expected a list of {n} values, got {value!r}"
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected:
        hint = " (YAML reads yes/no/on/off/true/false as booleans; quote the value)" \
            if isinstance(value, bool) and kind == "string_type" else ""
        return f"{key or 'config'}: expected {expected}, got {value!r}{hint}"
    return f"{key or 'config'}: {err['msg']}"


def _config_error(e: ValidationError, prefix: tuple = ()) -> ConfigError:
    """A ValidationError as one ConfigError: one line per problem.  `prefix`: the section's key."""
    lines = list(dict.fromkeys(line for err in e.errors()
                               for line in _explain({**err, "loc": prefix + tuple(err["loc"])}).split("\n")))
    if len(lines) == 1:
        return ConfigError(lines[0])
    return ConfigError(f"{len(lines)} config problems:\n  - " + "\n  - ".join(lines))


# ----------------------------------------------------------------------------- building


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
    file_dict = load_yaml(yaml_path) if yaml_path else {}
    set_dict = parse_overrides(overrides or [])
    merged: dict = {"stage": stage}
    for layer in (defaults or {}, file_dict, set_dict):
        _deep_update(merged, copy.deepcopy(layer))
    return from_dict(merged), file_dict, set_dict


def validate(cfg: ExperimentCfg, world_size: int | None = None) -> None:
    """Every rule again (fields may have been assigned since construction), plus the world size."""
    from_dict(to_dict(cfg))
    t = cfg.train
    if world_size is not None and t.global_batch % (t.micro_batch * world_size):
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch x world size "
            f"= {t.micro_batch} x {world_size}; choose global_batch as a multiple of "
            f"{t.micro_batch * world_size} or change micro_batch / the number of ranks")


def to_dict(cfg: ExperimentCfg) -> dict:
    """Plain YAML/JSON types, keys as YAML spells them (`init: {from: ...}`, tuples as lists)."""
    def lists(x):
        if isinstance(x, dict):
            return {k: lists(v) for k, v in x.items()}
        return list(x) if isinstance(x, tuple) else x
    return lists(cfg.model_dump(by_alias=True))


def from_dict(data: dict) -> ExperimentCfg:
    """A checked ExperimentCfg from a dict (a manifest's or config.yaml's config); missing keys take
    their defaults."""
    try:
        return ExperimentCfg.model_validate(data)
    except ValidationError as e:
        raise _config_error(e) from None


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
