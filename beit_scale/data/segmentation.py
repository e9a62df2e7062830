"""Semantic segmentation data: ADE20K layout, a generic image+mask folder, joint transforms.

Layouts (``find_pairs``):

* ``ade20k``: ``<root>/images/{training,validation}/*.jpg`` with
  ``<root>/annotations/{training,validation}/*.png`` of the same stem; split "train" is
  ``training``, "val" is ``validation`` (a folder named like the split itself is used first).
  With ``reduce_zero_label`` (ADE20K: 0 = "other") label 0 becomes ignored (255) and the others
  shift down by one, giving classes 0..149.
* ``folder``: ``<root>/<split>/**/<name>.<img ext>`` with ``<root>/masks/<split>/**/<name>.png``
  (the embedded set, ``synthetic.ensure_synthetic_segmentation``, is written this way: an
  ImageFolder over ``<root>/<split>`` keeps working for the other stages).

Masks are 8-bit class maps (mode L or P); 255 is ignored. Bad data never kills a worker:
an unreadable image or mask, or a mask whose size differs from its image, makes the sample be
replaced by the next good one; label values outside [0, num_classes) become 255. Each sample
carries the counts of what was met while producing it (``flags``, named by ``FLAG_NAMES``), so
the task can sum them over batches and ranks and report them wherever the workers ran.

Samples are ``(image uint8 [3, S, S], labels uint8 [S, S], hw int64 [2], flags int64 [3])``:
training returns random crops (``hw`` = the crop); evaluation returns the whole image resized
to the test scale and padded to a fixed canvas (pixels 0, labels 255) so batches stack, with
``hw`` the valid size. All randomness comes from the global generators the dataset seeds from
the sample key (datasets.seeded), so a sample is reproducible whatever the worker.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from .datasets import IMG_EXTENSIONS, parse_key, seeded
from .synthetic import MASK_DIR

__all__ = ["LAYOUTS", "FLAG_NAMES", "IGNORE", "find_pairs", "detect_layout", "SegTrainTransform",
           "SegEvalTransform", "SegmentationDataset", "declared_num_classes", "max_label_seen",
           "check_num_classes", "flags_summary", "palette", "overlay_grid"]

LAYOUTS = ("auto", "ade20k", "folder")
FLAG_NAMES = ("unreadable", "size_mismatch", "bad_label_pixels")
IGNORE = 255
_ADE_SPLITS = {"train": "training", "val": "validation"}


# ----------------------------------------------------------------------------- layouts


def detect_layout(root: str | os.PathLike) -> str:
    """``ade20k`` when ``root`` has images/ and annotations/, else ``folder``."""
    root = Path(root)
    return "ade20k" if (root / "images").is_dir() and (root / "annotations").is_dir() else "folder"


def _images_under(d: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, files in os.walk(d, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        out += [Path(dirpath) / f for f in sorted(files)
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return out


def find_pairs(root: str | os.PathLike, split: str, layout: str = "auto") -> list[tuple[str, str]]:
    """``[(image path, mask path)]`` of ``split`` (sorted); images without a mask are left out
    with one warning. FileNotFoundError / ValueError (naming the expected layout) when there is
    no such split or no pair at all."""
    root = Path(root).expanduser()
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "ade20k":
        sub = split if (root / "images" / split).is_dir() else _ADE_SPLITS.get(split, split)
        img_dir, mask_dir = root / "images" / sub, root / "annotations" / sub
        expected = f"{root}/images/{sub}/*.jpg with {root}/annotations/{sub}/*.png"
    elif layout == "folder":
        img_dir, mask_dir = root / split, root / MASK_DIR / split
        expected = f"{root}/{split}/**/<name>.jpg with {root}/{MASK_DIR}/{split}/**/<name>.png"
    else:
        raise ValueError(f"unknown segmentation layout {layout!r}; expected one of {LAYOUTS}")
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"segmentation split {split!r} not found: expected {expected}")
    pairs, missing = [], []
    for img in _images_under(img_dir):
        mask = (mask_dir / img.relative_to(img_dir)).with_suffix(".png")
        (pairs.append((str(img), str(mask))) if mask.is_file() else missing.append(str(img)))
    if missing:
        warnings.warn(f"{len(missing)} image(s) in {img_dir} have no mask and are left out "
                      f"(first: {missing[0]})", RuntimeWarning, stacklevel=2)
    if not pairs:
        raise ValueError(f"no image+mask pairs for split {split!r}: expected {expected}")
    return pairs


# ----------------------------------------------------------------------------- class counts


def declared_num_classes(root: str | os.PathLike) -> int | None:
    """The class count a dataset declares: ``seg_classes`` in ``<root>/labels.json`` (the
    embedded set), else None."""
    try:
        classes = json.loads((Path(root) / "labels.json").read_text()).get("seg_classes")
    except (OSError, ValueError, AttributeError):
        return None
    return len(classes) if classes else None


def max_label_seen(pairs: Sequence[tuple[str, str]], reduce_zero_label: bool,
                   max_files: int = 32) -> int | None:
    """The largest class value (after ``reduce_zero_label``; 255 ignored) in up to ``max_files``
    evenly spread masks, or None if none could be read."""
    step = max(1, len(pairs) // max_files)
    top = None
    for _, mask in list(pairs)[::step][:max_files]:
        try:
            lab = _reduce(np.asarray(Image.open(mask)), reduce_zero_label)
        except Exception:  # noqa: BLE001 - a bad mask is counted at load time, not here
            continue
        vals = lab[lab != IGNORE]
        if vals.size:
            top = max(top or 0, int(vals.max()))
    return top


def check_num_classes(root, pairs, num_classes: int, reduce_zero_label: bool) -> None:
    """ValueError naming the fix when ``num_classes`` disagrees with the data: a declared class
    count that differs, or label values at or above ``num_classes`` in the sampled masks."""
    declared = declared_num_classes(root)
    if declared is not None and declared != num_classes:
        raise ValueError(f"the dataset at {root} declares {declared} segmentation classes "
                         f"(labels.json) but num_classes={num_classes}; set "
                         f"model.num_classes={declared}")
    top = max_label_seen(pairs, reduce_zero_label)
    if top is not None and top >= num_classes:
        hint = "" if reduce_zero_label else " (or data.reduce_zero_label=true if 0 means 'other')"
        raise ValueError(f"masks under {root} hold class {top} but num_classes={num_classes}: set "
                         f"model.num_classes>={top + 1}{hint}")


def flags_summary(flags) -> str | None:
    """One report line from summed flags, or None when nothing was wrong."""
    counts = [int(v) for v in flags]
    if not any(counts):
        return None
    return ("segmentation data problems: " + ", ".join(
        f"{n}={c}" for n, c in zip(FLAG_NAMES, counts)) +
        " (unreadable / size-mismatched samples were replaced, bad label pixels ignored)")


# ----------------------------------------------------------------------------- transforms


def _reduce(lab: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    if lab.ndim != 2:
        raise ValueError(f"mask has shape {lab.shape}; expected a single-channel class map")
    lab = lab.astype(np.int64)
    if reduce_zero_label:
        lab = np.where(lab == 0, IGNORE, lab - 1)
        lab[lab == IGNORE - 1] = IGNORE
    return lab


def _rescale_to_fit(w: int, h: int, long: float, short: float) -> tuple[int, int]:
    """(w, h) scaled, keeping the aspect ratio, so that the long side <= long and the short side
    <= short, with one of the two reached (mmseg's keep-ratio Resize)."""
    s = min(long / max(w, h), short / min(w, h))
    return max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))


def _resize_pair(img: Image.Image, lab: np.ndarray, size: tuple[int, int]):
    if img.size == size:
        return img, lab
    img = img.resize(size, Image.BILINEAR)
    lab = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize(size, Image.NEAREST))
    return img, lab


class SegTrainTransform:
    """The reference training pipeline on (PIL image, label array):
    random keep-ratio resize to ``scale`` x U(ratio_range); random ``crop`` x ``crop`` window in
    which no single class covers more than ``cat_max_ratio`` of the labelled pixels (10 tries);
    horizontal flip; photometric distortion (brightness +-32, contrast and saturation x[0.5, 1.5],
    hue +-18 degrees, each with probability 1/2, contrast first or last); padding to the crop
    (pixels 0, labels 255)."""

    def __init__(self, crop: int, scale: tuple[int, int] | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 hflip: float = 0.5, photometric: bool = True):
        self.crop = crop
        self.scale = tuple(scale) if scale else (4 * crop, crop)  # (2048, 512) for a 512 crop
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.hflip = hflip
        self.photometric = photometric

    def __call__(self, img: Image.Image, lab: np.ndarray):
        r = random.uniform(*self.ratio_range)
        img, lab = _resize_pair(img, lab, _rescale_to_fit(*img.size, self.scale[0] * r,
                                                          self.scale[1] * r))
        y, x = self._crop_origin(lab)
        c = self.crop
        img, lab = img.crop((x, y, x + c, y + c)), lab[y:y + c, x:x + c]  # PIL pads with 0
        if random.random() < self.hflip:
            img, lab = TF.hflip(img), lab[:, ::-1]
        t = TF.pil_to_tensor(img)
        if self.photometric:
            t = photometric_distortion(t)
        out = np.full((c, c), IGNORE, np.uint8)
        out[:lab.shape[0], :lab.shape[1]] = lab
        return t, torch.from_numpy(out)

    def _crop_origin(self, lab: np.ndarray) -> tuple[int, int]:
        h, w = lab.shape
        c = self.crop
        y = x = 0
        for _ in range(10):
            y, x = random.randint(0, max(h - c, 0)), random.randint(0, max(w - c, 0))
            if self.cat_max_ratio >= 1.0:
                break
            win = lab[y:y + c, x:x + c]
            _, counts = np.unique(win[win != IGNORE], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return y, x


def photometric_distortion(t: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a uint8 [3, H, W] tensor (global generators)."""
    x = t.float()
    if random.random() < 0.5:
        x = (x + random.uniform(-32, 32)).clamp(0, 255)
    contrast_last = random.random() < 0.5
    alpha = random.uniform(0.5, 1.5) if random.random() < 0.5 else None
    if alpha is not None and not contrast_last:
        x = (x * alpha).clamp(0, 255)
    y = x.round().to(torch.uint8)
    if random.random() < 0.5:
        y = TF.adjust_saturation(y, random.uniform(0.5, 1.5))
    if random.random() < 0.5:
        y = TF.adjust_hue(y, random.uniform(-18, 18) / 360.0)
    if alpha is not None and contrast_last:
        y = (y.float() * alpha).clamp(0, 255).round().to(torch.uint8)
    return y


class SegEvalTransform:
    """Keep-ratio resize to the test scale (``scale``, default (4 crop, crop)), labels nearest;
    pad to a ``canvas`` x ``canvas`` square (default 2 crop; a larger image is scaled down to
    fit). Metrics are computed at this scale (mmseg resizes logits back to the original size)."""

    def __init__(self, crop: int, scale: tuple[int, int] | None = None, canvas: int | None = None):
        self.scale = tuple(scale) if scale else (4 * crop, crop)
        self.canvas = canvas or 2 * crop

    def out_size(self, w: int, h: int) -> tuple[int, int]:
        """(w, h) of an image of size (w, h) after the resize (the valid part of the canvas)."""
        w, h = _rescale_to_fit(w, h, *self.scale)
        return _rescale_to_fit(w, h, self.canvas, self.canvas) if max(w, h) > self.canvas else (w, h)

    def __call__(self, img: Image.Image, lab: np.ndarray):
        w, h = self.out_size(*img.size)
        img, lab = _resize_pair(img, lab, (w, h))
        k = self.canvas
        t = torch.zeros((3, k, k), dtype=torch.uint8)
        t[:, :h, :w] = TF.pil_to_tensor(img)
        out = torch.full((k, k), IGNORE, dtype=torch.uint8)
        out[:h, :w] = torch.from_numpy(np.array(lab, dtype=np.uint8))  # a writable copy
        return t, out


# ----------------------------------------------------------------------------- dataset


class SegmentationDataset(Dataset):
    """key (index or (index, seed)) -> ``(image, labels, hw, flags)`` (see the module doc)."""

    def __init__(self, pairs: Sequence[tuple[str, str]], transform, num_classes: int,
                 reduce_zero_label: bool = False):
        if not 1 <= num_classes <= IGNORE:
            raise ValueError(f"num_classes={num_classes} must be in [1, {IGNORE}] (uint8 labels)")
        self.pairs = list(pairs)
        self.transform = transform
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self._bad: dict[int, str] = {}  # index -> flag name, per process

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int):
        """(image, label array, None) or (None, None, flag name) for a sample to skip."""
        if i in self._bad:
            return None, None, self._bad[i]
        img_path, mask_path = self.pairs[i]
        try:
            with open(img_path, "rb") as f:
                img = Image.open(f).convert("RGB")
            with open(mask_path, "rb") as f:
                lab = _reduce(np.asarray(Image.open(f)), self.reduce_zero_label)
        except Exception as e:  # noqa: BLE001 - any decoder failure must not kill a worker
            return self._skip(i, "unreadable", f"{type(e).__name__}: {e}")
        if lab.shape != (img.size[1], img.size[0]):
            return self._skip(i, "size_mismatch",
                              f"mask {lab.shape[::-1]} vs image {img.size} (w, h)")
        return img, lab, None

    def _skip(self, i: int, flag: str, reason: str):
        self._bad[i] = flag
        warnings.warn(f"skipping segmentation sample {self.pairs[i][0]} ({flag}: {reason})",
                      RuntimeWarning, stacklevel=3)
        return None, None, flag

    def __getitem__(self, key):
        index, seed = parse_key(key)
        n = len(self.pairs)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        flags = torch.zeros(len(FLAG_NAMES), dtype=torch.int64)
        for k in range(n):
            img, lab, flag = self._load((index + k) % n)
            if flag is None:
                break
            flags[FLAG_NAMES.index(flag)] += 1
        else:
            raise RuntimeError(f"every segmentation sample is unreadable or mismatched "
                               f"(first: {self.pairs[0]})")
        bad = (lab != IGNORE) & ((lab < 0) | (lab >= self.num_classes))
        flags[2] = int(bad.sum())
        lab = np.where(bad, IGNORE, lab).astype(np.uint8)
        with seeded(seed):
            img_t, lab_t = self.transform(img, lab)
        if isinstance(self.transform, SegEvalTransform):
            valid = self.transform.out_size(*img.size)[::-1]
        else:
            valid = tuple(lab_t.shape[-2:])
        return img_t, lab_t, torch.tensor(valid, dtype=torch.int64), flags


# ----------------------------------------------------------------------------- pictures


def palette(num_classes: int) -> np.ndarray:
    """uint8 [num_classes, 3]: distinct, saturated colours (golden-ratio hues, alternating
    brightness), the same for a class in every picture."""
    import colorsys
    cols = [colorsys.hsv_to_rgb((c * 0.6180339887) % 1.0, 0.85, 1.0 if c % 2 else 0.7)
            for c in range(num_classes)]
    return (np.array(cols).reshape(-1, 3) * 255 + 0.5).astype(np.uint8)


def overlay_grid(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                 num_classes: int, alpha: float = 0.6) -> np.ndarray:
    """uint8 [N*H, 3*W, 3]: one row per image, ``image | ground truth | prediction``, the class
    maps blended over the image (ignored pixels left as the image, to show what is not scored).
    ``images`` uint8 [N, 3, H, W]; ``labels``, ``preds`` [N, H, W]."""
    pal = palette(num_classes).astype(np.float32)
    rows = []
    for img, lab, pred in zip(images.cpu().numpy(), labels.cpu().numpy(), preds.cpu().numpy()):
        base = img.transpose(1, 2, 0).astype(np.float32)
        panes = [base]
        for cls_map in (lab, pred):
            known = (cls_map != IGNORE) & (cls_map < num_classes)
            color = pal[np.where(known, cls_map, 0)]
            panes.append(np.where(known[..., None], (1 - alpha) * base + alpha * color, base))
        rows.append(np.concatenate(panes, axis=1))
    return np.clip(np.concatenate(rows, axis=0) + 0.5, 0, 255).astype(np.uint8)
