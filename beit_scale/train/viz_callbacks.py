"""The MIM stage's picture: what the model predicts at masked patches, decoded into pixels.

`MIMTask.log_images` (run by the trainer's ImageLogger every `train.image_log_every` steps and at
the last step, on every rank: the forward may be a ZeRO-3 collective) hands the model's output to
these functions on rank 0, which writes the grid to tensorboard (tag `mim/predictions`) and as
`mim_predictions.png` in the run dir (the demo's final report names it).

Columns are images; rows, top to bottom:
  mim.target=tokens: the input, the masked input (masked patches grey), the tokenizer's
      reconstruction of the true tokens, and its reconstruction from the tokens the model
      predicts at the masked positions (visible positions keep the true tokens; these two rows
      need the tokenizer's decoder);
  mim.target=pixels: the input, the masked input, and the input with the masked patches replaced
      by the predicted pixels (each predicted patch un-normalized with the true patch's mean and
      standard deviation, which the per-patch-normalized target removed, as MAE shows it).
All rows are float images in [0, 1] at the model's input size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

GRID_IMAGES = 4          # columns of the grid (the first images of the last batch)
MASK_GREY = 0.5
PNG_NAME = "mim_predictions.png"
TB_TAG = "mim/predictions"


def masked_view(img01: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """img01 [B, 3, H, W] with the patches where ``mask`` [B, N] (row-major) is True painted grey."""
    B, _, H, W = img01.shape
    m = mask.reshape(B, 1, H // patch_size, W // patch_size).to(img01.dtype)
    m = F.interpolate(m, scale_factor=patch_size, mode="nearest")
    return img01 * (1 - m) + MASK_GREY * m


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def token_rows(tokenizer, img01: torch.Tensor, mask: torch.Tensor, true_ids: torch.Tensor,
               pred_masked: torch.Tensor, patch_size: int) -> list[torch.Tensor]:
    """Rows for mim.target=tokens. ``true_ids`` [B, N]: the tokenizer's ids; ``pred_masked`` [M]:
    the model's argmax at the masked positions, in ``true_ids[mask]`` order. A tokenizer without
    a decoder (DALL-E converted from its encoder alone) gives the first two rows only."""
    rows = [img01, masked_view(img01, mask, patch_size)]
    if not getattr(getattr(tokenizer, "cfg", None), "has_decoder", True):
        return rows
    B, N = true_ids.shape
    g = int(round(N ** 0.5))
    mixed = true_ids.clone()
    mixed[mask] = pred_masked
    size = img01.shape[-1]
    recon = [_resize(tokenizer.decode_indices(ids.view(B, g, g)).float(), size).clamp(0, 1)
             for ids in (true_ids, mixed)]
    return rows + recon


@torch.no_grad()
def pixel_rows(x_norm: torch.Tensor, mask: torch.Tensor, pred_masked: torch.Tensor,
               patch_size: int) -> list[torch.Tensor]:
    """Rows for mim.target=pixels. ``x_norm`` [B, 3, H, W]: the ImageNet-normalized model input;
    ``pred_masked`` [M, p*p*3]: the model's per-patch-normalized pixels at the masked patches."""
    from beit_scale.data.transforms import denormalize
    from beit_scale.models.mim_pixels import denormalize_patches, patchify, unpatchify
    x = x_norm.float()
    B, _, H, W = x.shape
    full = torch.zeros_like(patchify(x, patch_size))
    full[mask] = pred_masked.float()
    pred = torch.where(mask[..., None], denormalize_patches(full, x, patch_size), patchify(x, patch_size))
    pred_img = unpatchify(pred, patch_size, (H // patch_size, W // patch_size))
    img01 = denormalize(x).clamp(0, 1)
    return [img01, masked_view(img01, mask, patch_size), denormalize(pred_img).clamp(0, 1)]


def make_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of [B, 3, H, W] images in [0, 1] -> one [3, H', W'] image (columns: the B images)."""
    import torchvision
    return torchvision.utils.make_grid(torch.cat([r.float().cpu() for r in rows]), nrow=rows[0].shape[0],
                                       padding=2, pad_value=1.0)


def write_grid(writer, grid: torch.Tensor, step: int, run_dir: Path | None) -> None:
    """To tensorboard, and as PNG_NAME in the run dir (replaced atomically at each call)."""
    writer.add_image(TB_TAG, grid, step)
    if run_dir is not None:
        from PIL import Image
        from beit_scale.io import atomic_path
        arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        with atomic_path(Path(run_dir) / PNG_NAME) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
