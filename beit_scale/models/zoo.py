"""The BEiT model zoo: a registry of typed configs, buildable by name.

Every size is a frozen ``BeitConfig``; runs change it with small overrides
(``get_config('beit_base_patch16_224', drop_path_rate=0.2)``) instead of copying it.
``build_model`` turns a name or a config into a classifier or a MIM model and honours the
default-device context manager, so ``with torch.device('meta'): build_model(...)`` allocates
nothing (used by the memory model and to count parameters of the 1B model).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

__all__ = [
    "BeitConfig", "register", "get_config", "list_models", "build_model", "resolve_config",
    "REL_POS_CHOICES", "TASKS",
]

# 'auto' is resolved by task: 'shared' for MIM pretraining (the paper recipe),
# 'layer' for classifiers (what fine-tuned BEiT checkpoints, and timm, use).
REL_POS_CHOICES = ("layer", "shared", "none", "auto")
TASKS = ("classify", "mim")


@dataclass(frozen=True)
class BeitConfig:
    name: str = "custom"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    # None or 0 disables layer scale (no gamma_1/gamma_2 parameters).
    layer_scale_init: Optional[float] = 0.1
    drop_path_rate: float = 0.1
    rel_pos_bias: str = "auto"
    abs_pos_emb: bool = False
    num_classes: int = 1000
    vocab_size: int = 8192
    init_std: float = 0.02

    def __post_init__(self):
        problems = []
        if self.rel_pos_bias not in REL_POS_CHOICES:
            problems.append(f"rel_pos_bias={self.rel_pos_bias!r} must be one of {REL_POS_CHOICES}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        for f in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim",
                  "vocab_size"):
            if getattr(self, f) <= 0:
                problems.append(f"{f}={getattr(self, f)} must be positive")
        if self.num_classes < 0:
            problems.append(f"num_classes={self.num_classes} must be >= 0")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if problems:
            raise ValueError(f"invalid BeitConfig {self.name!r}: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def replace(self, **overrides) -> "BeitConfig":
        _check_fields(overrides, self.name)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = tuple(f.name for f in dataclasses.fields(BeitConfig))


def _check_fields(overrides: dict, name: str) -> None:
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown BeitConfig field(s) {unknown} for model {name!r}; valid fields are: "
            + ", ".join(_FIELDS))


_REGISTRY: dict[str, BeitConfig] = {}


def register(cfg: BeitConfig) -> BeitConfig:
    if cfg.name in _REGISTRY:
        raise ValueError(f"model {cfg.name!r} is already registered")
    _REGISTRY[cfg.name] = cfg
    return cfg


def _size(name, dim, depth, heads, mlp, ls, patch=16, dpr=0.1):
    return register(BeitConfig(name=name, patch_size=patch, embed_dim=dim, depth=depth,
                               num_heads=heads, mlp_dim=mlp, layer_scale_init=ls,
                               drop_path_rate=dpr))


# Sizes. Layer scale 0.1 up to Base, 1e-5 for Large and bigger (BEiT paper / official code).
_size("beit_debug", 64, 2, 2, 256, 0.1, dpr=0.0)
_size("beit_mini", 128, 6, 4, 512, 0.1, dpr=0.0)   # CPU demo size: ~0.6 GFLOPs per image
_size("beit_tiny", 192, 12, 3, 768, 0.1)
_size("beit_small", 384, 12, 6, 1536, 0.1)
_size("beit_base_patch16_224", 768, 12, 12, 3072, 0.1)
_size("beit_large_patch16_224", 1024, 24, 16, 4096, 1e-5)
_size("beit_huge_patch16_224", 1280, 32, 16, 5120, 1e-5)
_size("beit_giant_patch14_224", 1408, 40, 16, 6144, 1e-5, patch=14)


def list_models() -> list[str]:
    """Registered model names, smallest first (registration order)."""
    return list(_REGISTRY)


def get_config(name: str, **overrides) -> BeitConfig:
    """The registered config ``name`` with ``overrides`` applied (unknown fields -> ValueError)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(_REGISTRY)}")
    _check_fields(overrides, name)
    return dataclasses.replace(_REGISTRY[name], **overrides)


def resolve_config(cfg: BeitConfig, task: str) -> BeitConfig:
    """Replace rel_pos_bias='auto' by the task default ('shared' for mim, 'layer' for classify)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if cfg.rel_pos_bias == "auto":
        cfg = dataclasses.replace(cfg, rel_pos_bias="shared" if task == "mim" else "layer")
    return cfg


def build_model(name_or_cfg: Union[str, BeitConfig], task: str = "classify", **overrides):
    """Build a ``BeitClassifier`` (task='classify') or ``BeitForMIM`` (task='mim').

    Parameters are created on the current default device, so building under
    ``with torch.device('meta'):`` allocates no memory.
    """
    from .beit import BeitClassifier, BeitForMIM  # local import: zoo stays importable alone

    if isinstance(name_or_cfg, str):
        cfg = get_config(name_or_cfg, **overrides)
    elif isinstance(name_or_cfg, BeitConfig):
        cfg = name_or_cfg.replace(**overrides) if overrides else name_or_cfg
    else:
        raise TypeError(f"build_model expects a model name or a BeitConfig, got {type(name_or_cfg)}")
    cfg = resolve_config(cfg, task)
    return BeitForMIM(cfg) if task == "mim" else BeitClassifier(cfg)
