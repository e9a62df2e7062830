"""State-dict conversion: timm <-> beit_scale, and adapting checkpoints to another model config.

Our parameter names equal timm's except for the relative-position tables:

    timm                                           beit_scale
    blocks.{i}.attn.relative_position_bias_table   blocks.{i}.attn.rel_pos.table
    rel_pos_bias.relative_position_bias_table      shared_rel_pos.table

Index buffers (``relative_position_index``) are derived from the grid, never learned: they are
dropped on the way in (older timm versions saved them) and not produced on the way out (current
timm registers them as non-persistent, so a strict load must not see them). Pass
``with_index=True`` to ``to_timm`` for an old timm that expects them.
"""
from __future__ import annotations

import logging
import re
from typing import Mapping, Optional

import torch

from .beit import relative_position_index, resize_abs_pos_embed, resize_rel_pos_bias_table
from .zoo import BeitConfig, TASKS, resolve_config

__all__ = ["from_timm", "to_timm", "adapt_state_dict_to"]

log = logging.getLogger(__name__)

_TIMM_TABLE = "relative_position_bias_table"
_RENAMES_FROM_TIMM = (
    (re.compile(r"^blocks\.(\d+)\.attn\.relative_position_bias_table$"), r"blocks.\1.attn.rel_pos.table"),
    (re.compile(r"^rel_pos_bias\.relative_position_bias_table$"), "shared_rel_pos.table"),
)
_RENAMES_TO_TIMM = (
    (re.compile(r"^blocks\.(\d+)\.attn\.rel_pos\.table$"), r"blocks.\1.attn.relative_position_bias_table"),
    (re.compile(r"^shared_rel_pos\.table$"), "rel_pos_bias.relative_position_bias_table"),
)
# timm-only entries that carry no learned state in our model.
_TIMM_DERIVED = re.compile(r"(^|\.)(relative_position_index|k_bias)$")


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


WRAPPER_KEYS = ("model", "module", "state_dict", "model_ema")


def unwrap_state_dict(state_dict: Mapping) -> Mapping:
    """The weights inside a checkpoint that nests them (the official BEiT code: "model" /
    "model_ema"; DeepSpeed: "module"; Lightning-style: "state_dict"), level by level."""
    while isinstance(state_dict, Mapping):
        inner = next((state_dict[k] for k in WRAPPER_KEYS
                      if k in state_dict and isinstance(state_dict[k], Mapping)), None)
        if inner is None:
            break
        state_dict = inner
    return state_dict


def from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``Beit`` state dict -> a state dict for ``BeitClassifier`` (same tensors, renamed)."""
    sd = unwrap_state_dict(state_dict)
    out = {}
    for k, v in sd.items():
        if _TIMM_DERIVED.search(k):
            continue
        if k.startswith("norm.") and "fc_norm.weight" in sd:
            # timm with global_pool='avg' has norm=Identity, so this never happens for the zoo
            # models; refuse rather than silently drop weights we cannot place.
            raise ValueError(f"timm state dict has both 'norm' and 'fc_norm' ({k}); "
                             "only the avg-pool (fc_norm) layout is supported")
        out[_rename(k, _RENAMES_FROM_TIMM)] = v
    return out


def to_timm(state_dict: Mapping[str, torch.Tensor], with_index: bool = False) -> dict[str, torch.Tensor]:
    """Our classifier state dict -> timm ``Beit`` (loads with strict=True in current timm).

    MIM-only entries (mask_token, norm, lm_head) have no place in a timm classifier: ValueError.
    """
    sd = unwrap_state_dict(state_dict)
    mim_only = [k for k in sd if k == "mask_token" or k.startswith(("lm_head.", "norm."))]
    if mim_only:
        raise ValueError(f"to_timm converts classifiers; these MIM-only keys have no timm "
                         f"counterpart: {mim_only}. Adapt the checkpoint to a classifier first "
                         f"(adapt_state_dict_to(cfg, sd, task='classify')).")
    out = {}
    for k, v in sd.items():
        new = _rename(k, _RENAMES_TO_TIMM)
        out[new] = v
        if with_index and new.endswith(_TIMM_TABLE):
            grid = _grid_from_table_rows(v.shape[0])
            out[new[: -len(_TIMM_TABLE)] + "relative_position_index"] = relative_position_index(grid)
    return out


def _grid_from_table_rows(rows: int) -> tuple[int, int]:
    side = int(round((rows - 3) ** 0.5))
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(f"cannot infer a square grid from a rel-pos table with {rows} rows")
    g = (side + 1) // 2
    return (g, g)


def adapt_state_dict_to(cfg: BeitConfig, state_dict: Mapping[str, torch.Tensor],
                        task: str = "classify",
                        src_grid: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
    """Make a checkpoint (ours, e.g. from MIM pretraining) loadable into ``build_model(cfg, task)``.

    - a shared rel-pos table is copied into every block when the target uses per-layer tables
      (the BEiT fine-tuning recipe); per-layer tables are never merged into a shared one (error);
    - rel-pos tables and the absolute position embedding are resized bicubically when the patch
      grid differs (fine-tuning at 384 from 224); the source grid is inferred from the tables or
      given as ``src_grid``;
    - keys the target model does not have (mask_token, lm_head, final norm of a MIM model when
      fine-tuning, pos_embed when the target has none) are dropped and logged; a classifier head
      with another number of classes is dropped too, so it keeps its fresh init;
    - any other shape mismatch is an error.
    Load the result with ``model.load_state_dict(sd, strict=False)`` and check the missing keys
    (the fresh head of a fine-tuned model is expected there).
    """
    from .zoo import build_model  # local import: avoids a cycle at module import

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    cfg = resolve_config(cfg, task)
    with torch.device("meta"):
        target = build_model(cfg, task=task)
    want = {k: v.shape for k, v in target.state_dict().items()}
    new_grid = cfg.grid_size

    sd = dict(from_timm(state_dict))  # also accepts a timm state dict; ours passes through
    if src_grid is None:
        src_grid = next((_grid_from_table_rows(v.shape[0]) for k, v in sd.items()
                         if k.endswith("rel_pos.table")), None)
    if src_grid is None and "pos_embed" in sd:
        n = sd["pos_embed"].shape[1] - 1
        g = int(round(n ** 0.5))
        src_grid = (g, g)
    src_grid = tuple(src_grid) if src_grid is not None else new_grid

    out: dict[str, torch.Tensor] = {}
    dropped = []
    shared = sd.pop("shared_rel_pos.table", None)
    if shared is not None:
        shared = resize_rel_pos_bias_table(shared, src_grid, new_grid)
        if cfg.rel_pos_bias == "shared":
            out["shared_rel_pos.table"] = shared
        elif cfg.rel_pos_bias == "layer":
            for i in range(cfg.depth):
                out[f"blocks.{i}.attn.rel_pos.table"] = shared.clone()
        else:
            dropped.append("shared_rel_pos.table")
    for k, v in sd.items():
        if k.endswith("rel_pos.table"):
            if cfg.rel_pos_bias == "shared":
                raise ValueError(f"checkpoint has per-layer rel-pos tables ({k}) but the target uses "
                                 "one shared table; use rel_pos_bias='layer' for this checkpoint")
            v = resize_rel_pos_bias_table(v, src_grid, new_grid)
        elif k == "pos_embed" and k in want:
            v = resize_abs_pos_embed(v, src_grid, new_grid)
        if k not in want:
            dropped.append(k)
            continue
        if k.startswith("head.") and tuple(v.shape) != tuple(want[k]):
            dropped.append(k)
            continue
        out[k] = v
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(want[k])}"
           for k, v in out.items() if tuple(v.shape) != tuple(want[k])]
    if bad:
        raise ValueError("checkpoint does not fit the target config " + repr(cfg.name) + ": "
                         + "; ".join(bad))
    if dropped:
        log.info("adapt_state_dict_to(%s, task=%s): dropped %s", cfg.name, task, dropped)
    return out
