"""Segmentation evaluation, pure torch: confusion matrix, mIoU / mAcc / aAcc, sliding-window and
whole-image inference.

The confusion matrix is the only state an evaluation keeps: it is a sum over images, so ranks
each build their own and one all-reduce (in the task, via the dist helpers) gives every rank the
exact counts of a single-process evaluation; the metrics are computed from it afterwards. That
makes the numbers identical on 1 and N ranks, which averaging per-rank mIoUs would not.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .decoders import IGNORE_INDEX

__all__ = ["confusion_matrix", "seg_metrics", "slide_inference", "whole_inference",
           "window_starts"]


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 [K, K] with rows = ground truth, columns = prediction, over the pixels whose label is
    in [0, K) (``ignore_index`` and any other out-of-range value are skipped)."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = (label >= 0) & (label < num_classes) & (label != ignore_index)
    idx = label[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def seg_metrics(cm: torch.Tensor) -> dict:
    """mmseg's definitions from a confusion matrix (rows = truth):

    IoU_c = TP / (TP + FP + FN); Acc_c = TP / (TP + FN); a class absent from the ground truth and
    never predicted has IoU and Acc NaN and is left out of the means (nanmean); a class absent
    from the ground truth but predicted has IoU 0 (and Acc NaN). aAcc = sum TP / labelled pixels.
    Returns ``{"mIoU", "mAcc", "aAcc"}`` as floats in [0, 1] and ``"IoU"``/``"Acc"`` per class
    (lists of floats, NaN where undefined)."""
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    predicted = cm.sum(0)
    union = gt + predicted - tp
    iou = tp / union  # 0/0 -> NaN on purpose
    acc = tp / gt
    total = gt.sum()
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(tp.sum() / total) if total > 0 else math.nan,
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every ``stride``, the last one flush with
    the end (mmseg's grid); one window at 0 when the axis fits in a crop."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})


def slide_inference(fn: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor,
                    num_classes: int, crop: int | Sequence[int], stride: int | Sequence[int],
                    max_batch: int = 8) -> torch.Tensor:
    """Logits [B, K, H, W] of ``img`` [B, C, H, W] from ``fn`` applied to crop-sized windows.

    ``fn``: [b, C, ch, cw] -> [b, K, ch, cw]. Windows lie on the ``window_starts`` grid; where
    they overlap the logits are averaged (sum / per-pixel window count). An image smaller than a
    crop is zero-padded at the bottom/right for ``fn`` and the padding is cut off again.
    ``max_batch`` windows go through ``fn`` at once."""
    ch, cw = (crop, crop) if isinstance(crop, int) else tuple(crop)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if sh < 1 or sw < 1 or sh > ch or sw > cw:
        raise ValueError(f"stride {(sh, sw)} must be in [1, crop {(ch, cw)}] (gaps otherwise)")
    B, _, H, W = img.shape
    ph, pw = max(ch - H, 0), max(cw - W, 0)
    x = F.pad(img, (0, pw, 0, ph)) if ph or pw else img
    Hp, Wp = x.shape[-2:]
    boxes = [(y, xx) for y in window_starts(Hp, ch, sh) for xx in window_starts(Wp, cw, sw)]
    logits = None
    count = x.new_zeros((1, 1, Hp, Wp))
    per_call = max(1, max_batch // B)
    for k in range(0, len(boxes), per_call):
        chunk = boxes[k: k + per_call]
        out = fn(torch.cat([x[..., y:y + ch, xx:xx + cw] for y, xx in chunk]))
        if logits is None:
            logits = out.new_zeros((B, num_classes, Hp, Wp))
        for j, (y, xx) in enumerate(chunk):
            logits[..., y:y + ch, xx:xx + cw] += out[j * B:(j + 1) * B]
            count[..., y:y + ch, xx:xx + cw] += 1
    return (logits / count)[..., :H, :W]


def whole_inference(fn: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor,
                    size: int | Sequence[int]) -> torch.Tensor:
    """Logits at ``img``'s size from one pass of ``fn`` on ``img`` resized to ``size`` (the
    model's fixed input size: BEiT's relative-position tables belong to one patch grid)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    H, W = img.shape[-2:]
    x = img if (H, W) == size else F.interpolate(img, size=size, mode="bilinear",
                                                  align_corners=False)
    out = fn(x)
    return out if (H, W) == size else F.interpolate(out, size=(H, W), mode="bilinear",
                                                     align_corners=False)
