"""Image transforms for the three stages.

All randomness comes from the *global* python/numpy/torch generators, which the sample
datasets seed from each sample's key right before calling a transform (see datasets.py);
so a transform never needs a generator argument and every sample is reproducible.

MIM (BEiT): one random-resized crop, one flip and one colour jitter are drawn per sample and
applied to *both* views: a 224 view (bicubic) that the ViT sees as 14x14 patches of 16 px, and
a 112 view (lanczos) that the frozen dVAE turns into the 14x14 grid of target tokens. The two
views must cover the same pixels, or the targets would not line up with the patches.

Transport format: every transform returns **uint8 CHW** tensors (the pixels as decoded and
resampled, 0..255), not float. DataLoader workers hand batches to the training process through
shared memory, and float32 costs 4x the bytes (at 10 workers x prefetch 4 that was ~4 GB per
rank). The tasks convert on the device with `to_float_image` (scale to [0,1], ImageNet
normalisation for the backbone views), which reproduces the old float pipeline
(`to_tensor` + `Normalize` on the CPU) bit for bit: it is a 256-entry lookup table computed with
exactly those CPU ops, then indexed on the device.
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 [3,H,W] (a copy: the tensor must own its memory for shared-memory transport)."""
    return F.pil_to_tensor(img)


_LUTS: dict = {}


def _lut(normalize: bool, device: torch.device) -> torch.Tensor:
    """[3, 256] float32: the value the old float pipeline gave each uint8 level, per channel.

    Computed on the CPU with the ops torchvision's ``to_tensor`` (``.float().div(255)``) and
    ``Normalize`` (``.sub_(mean).div_(std)`` with [3,1,1] float32 tensors) use, so indexing it
    reproduces those numbers exactly on any device (a CUDA ``x / 255`` would instead multiply
    by the reciprocal and differ in the last bit)."""
    key = (bool(normalize), str(device))
    lut = _LUTS.get(key)
    if lut is None:
        levels = torch.arange(256, dtype=torch.uint8).view(1, 256, 1).expand(3, 256, 1)
        lut = levels.to(dtype=torch.float32).div(255)
        if normalize:
            mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
            lut = lut.sub_(mean).div_(std)
        lut = lut.view(3, 256).contiguous().to(device)
        _LUTS[key] = lut
    return lut


def to_float_image(x: torch.Tensor, normalize: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (on any device) -> float32 in [0,1], or ImageNet-normalised
    when ``normalize``; then cast to ``dtype`` (the model's) if given.

    The float32 values equal ``Normalize(IMAGENET)(to_tensor(pil))`` (or ``to_tensor(pil)``) of
    the old pipeline exactly. No host synchronisation: a table lookup on ``x``'s device.
    Float input is passed through (only cast), so callers that already hold floats still work.
    """
    if x.is_floating_point():
        return x if dtype is None else x.to(dtype)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float_image expects uint8 images, got {x.dtype}")
    if x.shape[-3] != 3:
        raise ValueError(f"to_float_image expects [..., 3, H, W] images, got shape {tuple(x.shape)}")
    lut = _lut(normalize, x.device)
    chan = torch.arange(3, device=x.device).view(3, 1, 1)
    out = lut[chan, x.to(torch.int64)]
    return out if dtype is None or dtype == torch.float32 else out.to(dtype)


class MIMTransform:
    """PIL RGB image -> (img_224 uint8 [3,S,S], img_112 uint8 [3,s,s]), same crop/flip/jitter.

    On the device: ``to_float_image(img_224, normalize=True)`` for the backbone (ImageNet
    normalisation) and ``to_float_image(img_112, normalize=False)`` ([0,1]) for the tokenizer."""

    def __init__(self, input_size: int = 224, second_input_size: int = 112,
                 scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.4):
        self.input_size = input_size
        self.second_input_size = second_input_size
        self.scale = tuple(scale)
        self.hflip = hflip
        # BEiT jitters brightness, contrast and saturation by the same amount and leaves hue.
        self.jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) \
            if color_jitter and color_jitter > 0 else None

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, _RATIO)
        flip = torch.rand(1).item() < self.hflip
        # Crop the source once per view with the view's own filter (a 112 view resampled from
        # the 224 view would be blurrier than a direct lanczos downsample).
        big = F.resized_crop(img, i, j, h, w, [self.input_size] * 2,
                             InterpolationMode.BICUBIC)
        small = F.resized_crop(img, i, j, h, w, [self.second_input_size] * 2,
                               InterpolationMode.LANCZOS)
        if flip:
            big, small = F.hflip(big), F.hflip(small)
        if self.jitter is not None:
            # Draw the jitter parameters once and apply the same ones to both views.
            order, b, c, s, hue = T.ColorJitter.get_params(
                self.jitter.brightness, self.jitter.contrast, self.jitter.saturation,
                self.jitter.hue)
            big, small = (_apply_jitter(v, order, b, c, s, hue) for v in (big, small))
        return _to_uint8(big), _to_uint8(small)

    def __repr__(self) -> str:
        return (f"MIMTransform(input_size={self.input_size}, second_input_size="
                f"{self.second_input_size}, scale={self.scale}, hflip={self.hflip}, "
                f"jitter={self.jitter})")


def _apply_jitter(img, order, b, c, s, h):
    for k in order.tolist():
        if k == 0 and b is not None:
            img = F.adjust_brightness(img, b)
        elif k == 1 and c is not None:
            img = F.adjust_contrast(img, c)
        elif k == 2 and s is not None:
            img = F.adjust_saturation(img, s)
        elif k == 3 and h is not None:
            img = F.adjust_hue(img, h)
    return img


class TokenizerTransform:
    """PIL -> uint8 [3,size,size]: random-resized crop (mild scales) + flip.

    The dVAE sees ``to_float_image(x, normalize=False)``, i.e. [0,1].

    The dVAE must reconstruct what MIM later tokenises (112 views of crops with scale down to
    0.08), but very small crops of 160 px images are mostly blur; (0.35, 1) keeps detail.
    """

    def __init__(self, size: int = 112, scale: tuple[float, float] = (0.35, 1.0),
                 hflip: float = 0.5):
        self.size = size
        self.t = T.Compose([
            T.RandomResizedCrop(size, scale=tuple(scale), ratio=_RATIO,
                                interpolation=InterpolationMode.LANCZOS),
            T.RandomHorizontalFlip(hflip),
            T.PILToTensor(),
        ])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.t(img)

    def __repr__(self) -> str:
        return f"TokenizerTransform({self.t})"


class ClassifyTransform:
    """PIL -> uint8 [3,size,size]; the classifier sees ``to_float_image(x, normalize=True)``.

    train: random-resized crop (bicubic) + flip (+ timm RandAugment when ``rand_augment`` is
    a timm config string such as ``"rand-m9-mstd0.5-inc1"``; off by default).
    eval: resize the short side to size/crop_pct, then centre crop (the usual 0.875 protocol).
    """

    def __init__(self, train: bool, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 hflip: float = 0.5, rand_augment: str | None = None, crop_pct: float = 0.875):
        self.train = train
        if train:
            ops = [T.RandomResizedCrop(size, scale=tuple(scale), ratio=_RATIO,
                                       interpolation=InterpolationMode.BICUBIC),
                   T.RandomHorizontalFlip(hflip)]
            if rand_augment:
                # timm's RandAugment draws from python `random`, which the datasets seed too.
                from timm.data.auto_augment import rand_augment_transform
                ops.append(rand_augment_transform(
                    rand_augment, {"translate_const": int(size * 0.45),
                                   "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)}))
        else:
            ops = [T.Resize(int(math.floor(size / crop_pct)),
                            interpolation=InterpolationMode.BICUBIC),
                   T.CenterCrop(size)]
        self.t = T.Compose(ops + [T.PILToTensor()])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.t(img)

    def __repr__(self) -> str:
        return f"ClassifyTransform(train={self.train}, {self.t})"


def denormalize(t: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation (for looking at MIM inputs)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=t.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=t.dtype).view(-1, 1, 1)
    return t * std + mean


__all__ = ["MIMTransform", "TokenizerTransform", "ClassifyTransform", "IMAGENET_MEAN",
           "IMAGENET_STD", "denormalize", "to_float_image"]
