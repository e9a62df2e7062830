"""Forward FLOPs of zoo models, counted (not estimated) on the meta device.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and attention at the
aten level; a multiply-add counts as 2 FLOPs. Elementwise ops (norms, GELU, softmax) are not
counted: they are a few percent of a ViT's work. Running on the meta device means no memory is
allocated and no arithmetic is done, so even the 1B model is counted in well under a second.
"""
from __future__ import annotations

from typing import Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from .zoo import BeitConfig, build_model

__all__ = ["count_forward_flops", "count_params"]


def count_forward_flops(name_or_cfg: Union[str, BeitConfig], task: str = "classify",
                        batch_size: int = 1, mask_ratio: float = 0.4, **overrides) -> int:
    """FLOPs of one forward pass on ``batch_size`` images (multiply-add = 2 FLOPs).

    For task='mim', ``mask_ratio`` of the patches are masked (the MIM head runs on those only).
    """
    with torch.device("meta"):
        model = build_model(name_or_cfg, task=task, **overrides).eval()
        cfg = model.cfg
        x = torch.empty(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
        with FlopCounterMode(display=False) as counter:
            if task == "mim":
                # Boolean indexing has a data-dependent size, which the meta device cannot
                # evaluate: run the backbone, then the head on the number of masked rows.
                model.forward_features(x)
                n_masked = int(round(mask_ratio * cfg.num_patches)) * batch_size
                model.lm_head(model.norm(torch.empty(n_masked, cfg.embed_dim)))
            else:
                model(x)
        flops = counter.get_total_flops()
    return int(flops)


def count_params(name_or_cfg: Union[str, BeitConfig], task: str = "classify", **overrides) -> int:
    with torch.device("meta"):
        model = build_model(name_or_cfg, task=task, **overrides)
    return sum(p.numel() for p in model.parameters())
