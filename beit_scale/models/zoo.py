"""The BEiT model zoo: a registry of typed configs, buildable by name.

Every size is a frozen ``BeitConfig``; runs change it with small overrides
(``get_config('beit_base_patch16_224', drop_path_rate=0.2)``) instead of copying it.
``build_model`` turns a name or a config into a classifier or a MIM model and honours the
default-device context manager, so ``with torch.device('meta'): build_model(...)`` allocates
nothing (used by the memory model and to count parameters of the 1B model).
"""
from __future__ import annotations

import dataclasses
from typing import Union

from .beit import BeitClassifier, BeitForMIM
from .config import REL_POS_CHOICES, TASKS, BeitConfig, _check_fields, resolve_config

__all__ = [
    "BeitConfig", "register", "get_config", "list_models", "build_model", "resolve_config",
    "REL_POS_CHOICES", "TASKS",
]

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


def build_model(name_or_cfg: Union[str, BeitConfig], task: str = "classify", **overrides):
    """Build a ``BeitClassifier`` (task='classify') or ``BeitForMIM`` (task='mim').

    Parameters are created on the current default device, so building under
    ``with torch.device('meta'):`` allocates no memory.
    """
    if isinstance(name_or_cfg, str):
        cfg = get_config(name_or_cfg, **overrides)
    elif isinstance(name_or_cfg, BeitConfig):
        cfg = name_or_cfg.replace(**overrides) if overrides else name_or_cfg
    else:
        raise TypeError(f"build_model expects a model name or a BeitConfig, got {type(name_or_cfg)}")
    cfg = resolve_config(cfg, task)
    return BeitForMIM(cfg) if task == "mim" else BeitClassifier(cfg)
