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

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes -> fully decoded PIL RGB (raises on anything unreadable)."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: keep the top 8 bits; convert("RGB") would clip.
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode != "I" or arr.max(initial=0) > 255 else 255
        img = Image.fromarray((arr.clip(0, top) * 255 // top).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency: convert through RGBA as PIL asks
    return img.convert("RGB")  # convert() forces the full decode inside the caller's try


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


def crop_params(width: int, height: int, scale, ratio=_RATIO) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` from the image size alone (before any decoding): the
    same draws from torch's generator, so the same box as on the decoded image."""
    shape_only = torch.empty(1).expand(1, height, width)  # no pixels: get_params reads the shape
    return T.RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))


def _simplejpeg():
    try:
        import simplejpeg
        return simplejpeg
    except ImportError:  # optional: without it every image goes through PIL
        return None


@dataclass
class Planned:
    """What ``MIMTransform.decode`` hands to ``MIMTransform.__call__``: the decoded pixels (uint8
    [3,H,W], possibly decoded at 1/r of the file's size) and the sample's random draws, with
    the crop box ``(top, left, height, width)`` in these pixels' coordinates."""
    pixels: torch.Tensor
    box: tuple[float, float, float, float]
    flip: bool
    jitter: tuple | None
    reduction: int = 1


def decode_reduced(data: bytes, reduce_for: callable) -> tuple[torch.Tensor, int, tuple]:
    """Decode ``data`` at the coarsest JPEG DCT scale (1/2, 1/4, 1/8) that
    ``reduce_for(width, height) -> (r, extra)`` allows; ``(uint8 [3,H,W], r used, extra)``.

    libjpeg-turbo (simplejpeg) for baseline YCbCr/grey JPEGs; everything else (PNG, CMYK,
    16-bit ...) through ``decode_rgb`` at full size. Truncated data raises (strict mode), as
    PIL does, so unreadable files are skipped the same way on both paths."""
    sj = _simplejpeg()
    if sj is not None and data[:2] == b"\xff\xd8":
        h, w, space, _ = sj.decode_jpeg_header(data)
        if space in ("YCbCr", "Gray"):
            r, extra = reduce_for(w, h)
            if r > 1:
                arr = sj.decode_jpeg(data, colorspace="RGB", min_factor=r,
                                     min_width=-(-w // r), min_height=-(-h // r))
                r = w / arr.shape[1]
            else:
                arr = sj.decode_jpeg(data, colorspace="RGB")
            return torch.from_numpy(arr).permute(2, 0, 1), r, extra
    img = decode_rgb(data)
    _, extra = reduce_for(*img.size)
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1), 1, extra


def _crop_resize_flip(p: Planned, size: int) -> torch.Tensor:
    """The planned crop of ``p.pixels`` resized to [3,size,size] (bicubic, antialiased), flipped
    if drawn. Whole pixels at the decoded scale: at most r-1 source pixels off the drawn box."""
    top, left, h, w = p.box
    t0, l0 = int(round(top)), int(round(left))
    crop = p.pixels[:, t0:t0 + max(1, int(round(h))), l0:l0 + max(1, int(round(w)))]
    out = _resize(crop, size, InterpolationMode.BICUBIC)
    return out.flip(-1) if p.flip else out


def _resize(x: torch.Tensor, size: int, mode: InterpolationMode) -> torch.Tensor:
    """uint8 [3,h,w] -> uint8 [3,size,size] with antialiasing: v2's resize keeps uint8 in torch's
    vectorised uint8 kernels (~4x faster than PIL's resampling here, docs/data.md); v1's
    ``F.resize`` would convert bicubic input to float and back (~6x slower than v2)."""
    return F2.resize(x, [size, size], interpolation=mode, antialias=True)


class MIMTransform:
    """Image -> (img_224 uint8 [3,S,S], img_112 uint8 [3,s,s]), same crop/flip/jitter.

    On the device: ``to_float_image(img_224, normalize=True)`` for the backbone (ImageNet
    normalisation) and ``to_float_image(img_112, normalize=False)`` ([0,1]) for the tokenizer.

    ``fast=True`` (default): the datasets call ``decode(bytes)``, which draws the crop, flip and
    jitter first (the same draws, in the same order, as the plain path) and decodes the JPEG
    with libjpeg-turbo; the 224 view is resized (bicubic, antialiased) on uint8 tensors,
    flipped, jittered once, and the 112 view is the 224 view downsampled 2x (bicubic,
    antialiased): the same crop at two resolutions, as in BEiT. ``reduce_decode=True`` also
    decodes the JPEG at 1/2, 1/4 or 1/8 scale (DCT domain) when the crop is at least twice that
    many times the 224 view (off by default: measured, it never triggers on ImageNet-sized
    files and saved ~20% of the decode on 1600x1200 ones; docs/data.md). ``fast=False``: the
    plain path on a PIL image (crop the source once per view, bicubic 224 and lanczos 112,
    jitter both views in PIL). The paths agree within the tolerance stated in docs/data.md
    (tested)."""

    def __init__(self, input_size: int = 224, second_input_size: int = 112,
                 scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.4, fast: bool = True, reduce_decode: bool = False):
        self.input_size = input_size
        self.second_input_size = second_input_size
        self.scale = tuple(scale)
        self.hflip = hflip
        self.fast = fast
        self.reduce_decode = reduce_decode
        # BEiT jitters brightness, contrast and saturation by the same amount and leaves hue.
        self.jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) \
            if color_jitter and color_jitter > 0 else None
        if not fast:
            self.decode = None  # the datasets then hand over decoded PIL images

    def _draw(self, width: int, height: int):
        """All random draws of a sample, in the plain path's order: crop, flip, jitter."""
        box = crop_params(width, height, self.scale)
        flip = torch.rand(1).item() < self.hflip
        jit = None
        if self.jitter is not None:
            jit = T.ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                           self.jitter.saturation, self.jitter.hue)
        return box, flip, jit

    def _reduction(self, box) -> int:
        """Largest DCT scale divisor r in (8, 4, 2) that leaves the crop >= 2x the 224 view
        (the final antialiased resize then still does most of the filtering: with 1x, heavily
        textured crops differed from the full decode by ~7 levels on average, with 2x by ~4.5)."""
        if not self.reduce_decode:
            return 1
        side = min(box[2], box[3])
        return next((r for r in (8, 4, 2) if side >= 2 * r * self.input_size), 1)

    def decode(self, data: bytes) -> Planned:
        def reduce_for(width, height):
            draws = self._draw(width, height)
            return self._reduction(draws[0]), draws
        pixels, r, (box, flip, jit) = decode_reduced(data, reduce_for)
        return Planned(pixels, tuple(v / r for v in box), flip, jit, r)

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(img, Planned):
            return self._fast(img)
        if self.fast:
            box, flip, jit = self._draw(*img.size)
            return self._fast(Planned(F.pil_to_tensor(img), box, flip, jit))
        (i, j, h, w), flip, jit = self._draw(*img.size)
        return self._plain(img, i, j, h, w, flip, jit)

    def _fast(self, p: Planned) -> tuple[torch.Tensor, torch.Tensor]:
        big = _crop_resize_flip(p, self.input_size)
        if p.jitter is not None:
            big = _apply_jitter(big, *p.jitter)
        small = _resize(big, self.second_input_size, InterpolationMode.BICUBIC)
        return big.contiguous(), small.contiguous()

    def _plain(self, img, i, j, h, w, flip, jit) -> tuple[torch.Tensor, torch.Tensor]:
        # The plain path: crop the source once per view, each with its own filter.
        big = F.resized_crop(img, i, j, h, w, [self.input_size] * 2,
                             InterpolationMode.BICUBIC)
        small = F.resized_crop(img, i, j, h, w, [self.second_input_size] * 2,
                               InterpolationMode.LANCZOS)
        if flip:
            big, small = F.hflip(big), F.hflip(small)
        if jit is not None:  # the same jitter parameters on both views
            big, small = (_apply_jitter(v, *jit) for v in (big, small))
        return _to_uint8(big), _to_uint8(small)

    def __repr__(self) -> str:
        return (f"MIMTransform(input_size={self.input_size}, second_input_size="
                f"{self.second_input_size}, scale={self.scale}, hflip={self.hflip}, "
                f"jitter={self.jitter}, fast={self.fast})")


def _apply_jitter(img, order, b, c, s, h):
    """ColorJitter with drawn parameters on a PIL image or a uint8 tensor. The v2 functional ops:
    on PIL the same kernels as v1 (identical pixels), on uint8 tensors ~1.6x faster than v1's."""
    for k in order.tolist():
        if k == 0 and b is not None:
            img = F2.adjust_brightness(img, b)
        elif k == 1 and c is not None:
            img = F2.adjust_contrast(img, c)
        elif k == 2 and s is not None:
            img = F2.adjust_saturation(img, s)
        elif k == 3 and h is not None:
            img = F2.adjust_hue(img, h)
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

    ``fast`` (train without RandAugment): the datasets call ``decode(bytes)``, which draws the
    crop and flip as the PIL path does (same order, same generator) and decodes with
    libjpeg-turbo; the crop is resized on uint8 tensors as in ``MIMTransform``. RandAugment
    works on PIL images, so with it (and for eval) the PIL path runs.
    """

    def __init__(self, train: bool, size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 hflip: float = 0.5, rand_augment: str | None = None, crop_pct: float = 0.875,
                 fast: bool = True):
        self.train = train
        self.size, self.scale, self.hflip = size, tuple(scale), hflip
        self.fast = fast and train and not rand_augment
        if not self.fast:
            self.decode = None  # the datasets then hand over decoded PIL images
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

    def _draw(self, width: int, height: int):
        """The training draws of a sample, in the PIL path's order: ``(crop box, flip, None)``."""
        return crop_params(width, height, self.scale), torch.rand(1).item() < self.hflip, None

    def decode(self, data: bytes) -> Planned:
        pixels, _, (box, flip, _) = decode_reduced(data, lambda w, h: (1, self._draw(w, h)))
        return Planned(pixels, box, flip, None)

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, Planned):
            return _crop_resize_flip(img, self.size).contiguous()
        return self.t(img)

    def __repr__(self) -> str:
        return f"ClassifyTransform(train={self.train}, fast={self.fast}, {self.t})"


def denormalize(t: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation (for looking at MIM inputs)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=t.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=t.dtype).view(-1, 1, 1)
    return t * std + mean


__all__ = ["MIMTransform", "TokenizerTransform", "ClassifyTransform", "IMAGENET_MEAN",
           "IMAGENET_STD", "denormalize", "to_float_image"]
