"""Pixel targets for masked image modeling (the BEiT paper's pixel-regression ablation).

The model's head predicts, at each masked patch, the patch's pixels flattened as
(row, column, channel), i.e. ``patch_size^2 * C`` values. Targets are normalized per patch (each
patch minus its own mean, over its own standard deviation across all its values), as later MIM
work (MAE) does because it gives better representations than raw pixels; the loss is the mean
squared error over the masked patches only: visible patches are in the input, so predicting them
teaches nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patchify", "unpatchify", "pixel_targets", "pixel_regression_loss", "denormalize_patches"]

EPS = 1e-6  # added to the variance: a flat patch (std 0) gets targets 0, not inf


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches row-major, each flattened (row, column, channel)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a multiple of patch_size={p}")
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of ``patchify``: [B, N, p*p*C] -> [B, C, gh*p, gw*p]."""
    B = patches.shape[0]
    (gh, gw), p = grid, patch_size
    x = patches.reshape(B, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, gh * p, gw * p)


def _patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True, unbiased=False) + EPS).sqrt()
    return mean, std


def pixel_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> per-patch normalized targets [B, N, p*p*C] (float32)."""
    patches = patchify(images.float(), patch_size)
    mean, std = _patch_stats(patches)
    return (patches - mean) / std


def pixel_regression_loss(pred: torch.Tensor, images: torch.Tensor, bool_masked_pos: torch.Tensor,
                          patch_size: int) -> torch.Tensor:
    """Mean squared error between ``pred`` [M, p*p*C] (the model's rows for the masked patches,
    row-major over (image, patch), as BeitForMIM returns them) and the normalized pixels of those
    patches; visible patches do not enter the loss."""
    mask = bool_masked_pos.reshape(images.shape[0], -1).bool()
    target = pixel_targets(images, patch_size)[mask]
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} do not match the {tuple(target.shape)} "
                         f"masked patches of these images")
    return F.mse_loss(pred.float(), target)


def denormalize_patches(pred: torch.Tensor, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch normalized predictions [B, N, p*p*C] -> pixels, with each true patch's mean and
    std (how MAE shows its predictions: the normalization removed them from the target)."""
    mean, std = _patch_stats(patchify(images.float(), patch_size))
    return pred.float() * std + mean
