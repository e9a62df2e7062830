"""JPEG decoding on the training device (``data.decode: cuda``).

With ``data.decode=cpu`` (the default) the loader workers decode every image and ship the
finished uint8 views (transforms.py). With ``cuda`` they ship the *encoded* JPEG bytes plus
everything the sample's seed decided on the CPU (crop box, flip, colour-jitter factors and
order; the MIM mask travels beside it as before), and the task turns a batch into the same uint8
views on the device: ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on CUDA), then the
transform's own crop / bicubic resize / flip / jitter code (``MIMTransform._fast``,
``ClassifyTransform.__call__`` on a ``Planned``) on the device tensors.  The random draws happen
in the worker, inside the sample's ``seeded(seed)``, in the CPU path's order, so both paths see
the same crop, flip, jitter and mask for a key; only the pixel arithmetic differs (the decoder's
IDCT/upsampling and CUDA's float resize vs the CPU's uint8 kernels), within the tolerance
measured in tests/test_gpu_decode.py and stated in docs/data.md.

Unreadable files are still caught in the worker, where they are counted and replaced as today
(datasets.py): a file that starts like a JPEG must have a parseable header
(``simplejpeg.decode_jpeg_header``) and an end-of-image marker, or it raises there.  What the
device decoder is not given (not a JPEG: PNG, BMP, ...; or a CMYK/YCCK JPEG) is decoded and
transformed in the worker by the CPU path and travels as finished views; text named .jpg, empty
files and the like fail that CPU decode and are counted unreadable exactly as with ``cpu``.
Damage inside the entropy-coded data of a JPEG whose header and end marker are intact is not
detected in the worker: on the device such an image is retried through the CPU decoder, and a
file that fails there too raises with its name.

The same code runs with ``device="cpu"`` (torchvision decodes CPU tensors too), which is how the
tests check the device path where no GPU is present.  Plain torch/torchvision: data layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import default_collate

from .transforms import Planned

# Colour spaces nvJPEG and torchvision's decoder turn into RGB exactly like libjpeg-turbo does.
DEVICE_SPACES = ("YCbCr", "Gray")
# The end-of-image marker FF D9 must lie in the file's last bytes (a little slack for padding
# some writers append); entropy-coded data never contains FF D9 (0xFF is stuffed as FF 00).
_EOI_WINDOW = 1024


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG the device decoder takes; None for anything else (not a
    JPEG, or a CMYK/YCCK one), which the CPU path decodes. Raises ``ValueError`` for a JPEG with
    a broken header or no end-of-image marker (truncated), so the worker counts it unreadable."""
    if data[:2] != b"\xff\xd8":
        return None
    import simplejpeg  # a dependency already (transforms.decode_reduced)
    height, width, space, _ = simplejpeg.decode_jpeg_header(data)  # ValueError when unparseable
    if space not in DEVICE_SPACES:
        return None
    if data.rfind(b"\xff\xd9", max(2, len(data) - _EOI_WINDOW)) < 0:
        raise ValueError("truncated JPEG: no end-of-image marker")
    return width, height


@dataclass
class Encoded:
    """One sample for the device: the JPEG bytes and the drawn ``(box, flip, jitter)``; or,
    for a file the CPU path decoded in the worker, its finished uint8 views."""
    data: bytes | None
    plan: tuple | None
    views: tuple[torch.Tensor, ...] | None = None
    transform: object = None  # what finishes it on the device (travels with the batch)


def _views(transform, p: Planned) -> tuple[torch.Tensor, ...]:
    """The transform's uint8 views of a planned sample, always as a tuple (MIM: 224 and 112;
    classification: one)."""
    out = transform(p)
    return out if isinstance(out, tuple) else (out,)


class DeviceDecode:
    """Wraps a stage transform with a fast path (``MIMTransform``, training
    ``ClassifyTransform``) for ``data.decode=cuda``: its ``decode(bytes)`` (called by the folder
    inside the sample's seeding and error handling) returns an ``Encoded``; ``__call__`` passes
    it through, and ``EncodedBatch.decode`` finishes it on the device."""

    def __init__(self, transform):
        if getattr(transform, "decode", None) is None or not hasattr(transform, "_draw"):
            raise ValueError(f"{transform!r} has no fast (bytes) path to run on the device")
        if getattr(transform, "reduce_decode", False):
            raise ValueError("reduce_decode decodes at 1/r scale on the CPU; the device decodes full size")
        self.transform = transform

    def decode(self, data: bytes) -> Encoded:
        size = jpeg_size(data)
        if size is None:  # not for the device: the CPU path here (raises if unreadable)
            return Encoded(None, None, _views(self.transform, self.transform.decode(data)), self.transform)
        box, flip, jit = self.transform._draw(*size)  # the CPU path's draws, in its order
        if jit is not None:  # plain ints: a tensor per sample would be a shared-memory block each
            jit = (tuple(jit[0].tolist()), *jit[1:])
        return Encoded(data, (box, flip, jit), None, self.transform)

    def __call__(self, sample: Encoded) -> Encoded:
        return sample

    def __repr__(self) -> str:
        return f"DeviceDecode({self.transform!r})"


class EncodedBatch:
    """A collated batch of ``Encoded`` samples: the JPEG bytes of all of them in one uint8 tensor
    (one shared-memory block per batch), their plans, and the worker-decoded views of the rest.

    Behaves like the image tensor it replaces where the trainer and tasks look at it:
    ``len(batch)``, slicing ``batch[:n]``; ``decode(device)`` gives the uint8 views
    (``[B,3,S,S]`` each). ``pin_memory`` is a no-op: the decoder reads the bytes from host memory."""

    def __init__(self, transform, data: torch.Tensor, spans: list, plans: list, views: list):
        self.transform, self.data, self.spans, self.plans, self.views = transform, data, spans, plans, views

    @classmethod
    def collate(cls, transform, samples: list[Encoded]) -> "EncodedBatch":
        spans, chunks, start = [], [], 0
        for s in samples:
            if s.data is None:
                spans.append(None)
            else:
                spans.append((start, start + len(s.data)))
                chunks.append(s.data)
                start += len(s.data)
        data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if start \
            else torch.empty(0, dtype=torch.uint8)
        return cls(transform, data, spans, [s.plan for s in samples], [s.views for s in samples])

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, idx: slice) -> "EncodedBatch":
        if not isinstance(idx, slice):
            raise TypeError("an EncodedBatch is sliced (batch[:n]); decode() it for single images")
        return EncodedBatch(self.transform, self.data, self.spans[idx], self.plans[idx], self.views[idx])

    def pin_memory(self) -> "EncodedBatch":
        return self

    def decode(self, device) -> tuple[torch.Tensor, ...]:
        """The batch's uint8 views on ``device`` (a tuple: MIM's 224 and 112 views, or one)."""
        device = torch.device(device)
        jpegs = [i for i, s in enumerate(self.spans) if s is not None]
        pixels = decode_jpegs([self.data[a:b] for a, b in (self.spans[i] for i in jpegs)], device)
        out = [None] * len(self)
        for i, px in zip(jpegs, pixels):
            box, flip, jit = self.plans[i]
            if jit is not None:
                jit = (torch.tensor(jit[0]), *jit[1:])  # the jitter order, as ColorJitter drew it
            out[i] = _views(self.transform, Planned(px, box, flip, jit))
        for i, v in enumerate(self.views):
            if v is not None:
                out[i] = tuple(t.to(device, non_blocking=True) for t in v)
        return tuple(torch.stack(col) for col in zip(*out))


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 byte tensors (CPU) -> RGB uint8 ``[3,H,W]`` on ``device``: one batched decode; if
    that fails (a JPEG nvJPEG does not take, damaged entropy data), image by image, each failure
    retried with the CPU decoder, and one that fails there too raises naming its position."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out = []
    for k, d in enumerate(datas):
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB).to(device))
            except RuntimeError as e:
                raise RuntimeError(f"JPEG {k} of the batch passed the worker's header check but does "
                                   f"not decode: {e}") from e
    return out


def collate(samples: list):
    """DataLoader ``collate_fn`` for ``data.decode=cuda``: samples ``(Encoded, *rest)`` ->
    ``(EncodedBatch, *default_collate(rest))``; any other samples (a split that decodes on the
    CPU, e.g. classification eval) -> ``default_collate``."""
    if not samples or not isinstance(samples[0][0], Encoded):
        return default_collate(samples)
    head = EncodedBatch.collate(samples[0][0].transform, [s[0] for s in samples])
    rest = default_collate([tuple(s[1:]) for s in samples])
    return (head, *rest)


__all__ = ["DeviceDecode", "Encoded", "EncodedBatch", "collate", "decode_jpegs", "jpeg_size"]
