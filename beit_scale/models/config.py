"""The typed BEiT architecture config (``BeitConfig``) and its task resolution.

Its own module so that the model code (beit.py) and the zoo registry (zoo.py) both depend on it
and not on each other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

__all__ = ["BeitConfig", "resolve_config", "REL_POS_CHOICES", "TASKS"]

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


def resolve_config(cfg: BeitConfig, task: str) -> BeitConfig:
    """Replace rel_pos_bias='auto' by the task default ('shared' for mim, 'layer' for classify)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if cfg.rel_pos_bias == "auto":
        cfg = dataclasses.replace(cfg, rel_pos_bias="shared" if task == "mim" else "layer")
    return cfg
