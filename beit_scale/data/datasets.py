"""Corruption-tolerant ImageFolder and the per-stage sample datasets.

Keys: every sample dataset accepts ``dataset[(index, seed)]`` (what the resumable sampler in
``beit_scale/train`` yields) or a plain ``dataset[index]`` (then ``seed = index``). All random
choices of a sample (crop, flip, colour jitter, mask) are drawn from generators seeded from
that key inside ``seeded(seed)``, which restores the caller's generator states afterwards; so
a sample is the same whatever the worker count, the worker it lands on, or the order, and
loading with ``num_workers=0`` does not disturb the training process's RNG (dropout etc.).

Bad files: a file that cannot be decoded (truncated JPEG, non-image bytes) is skipped with a
warning naming it, recorded (``SafeImageFolder.bad_files`` and the per-process
``bad_file_report()``), and replaced by the next readable index, so batch shapes never change.
In DataLoader workers the warning is printed by the worker (the main process's report does
not see worker-side files); to count them across workers and ranks, set the folder's
``journal`` to a shared directory (the trainer uses the run dir): each process records every
unreadable file there as one file named after the path, so ``read_journal(dir)`` lists each
unreadable file exactly once however many workers, ranks or epochs met it.
``SafeImageFolder.verify()`` scans everything up front if a complete list is wanted at once.

Unusual but readable images are used, converted to RGB: grayscale, palette, RGBA/LA (alpha
dropped), CMYK, and 16-bit PNGs (scaled to 8 bits, not clipped: PIL's own ``convert`` would
saturate every level above 255 to white).
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from beit_scale.io import atomic_write_text

from .file_index import load_index
from .transforms import decode_rgb

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# path -> reason, for every unreadable file this process has met (see bad_file_report()).
_BAD_FILES: dict[str, str] = {}


def bad_file_report() -> list[tuple[str, str]]:
    """``[(path, reason), ...]`` of the unreadable files this process skipped so far."""
    return sorted(_BAD_FILES.items())


def bad_file_summary(max_names: int = 5) -> str | None:
    """One line for the trainer's log ("skipped N unreadable files: ..."), or None if none."""
    bad = bad_file_report()
    if not bad:
        return None
    names = ", ".join(p for p, _ in bad[:max_names])
    more = f" (+{len(bad) - max_names} more)" if len(bad) > max_names else ""
    return f"skipped {len(bad)} unreadable image file(s): {names}{more}"


def _journal_name(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:20] + ".txt"


def record_in_journal(journal: str | os.PathLike, path: str, reason: str) -> None:
    """Record one unreadable file in ``journal`` (a directory): one small file per path, so
    any number of workers and ranks record it at most once. Never raises."""
    try:
        out = Path(journal) / _journal_name(path)
        if out.exists():
            return
        atomic_write_text(out, f"{path}\t{reason}\n")  # readers never see half a record
    except OSError as e:
        warnings.warn(f"could not record unreadable file {path} in {journal}: {e}", RuntimeWarning)


def read_journal(journal: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(path, reason), ...]`` sorted by path: every unreadable file recorded in ``journal``."""
    d = Path(journal)
    if not d.is_dir():
        return []
    out = []
    for f in d.glob("*.txt"):
        try:
            path, _, reason = f.read_text().rstrip("\n").partition("\t")
        except OSError:
            continue
        out.append((path, reason))
    return sorted(out)


class SafeImageFolder:
    """``root/<class>/**/<image>`` -> ``samples = [(path, class_index)]`` (sorted classes).

    The file list comes from ``file_index.load_index``: with ``index_cache`` (a directory, e.g.
    the run dir's; None: ``file_index.default_cache_dir()``) it is cached with a fingerprint of
    the folder's directories, so a restart does not list the files again and a changed folder
    is listed anew; False (the default) lists every time. ``wait_for_index``: another process
    (rank 0) is building the index; wait for it instead of listing too.

    ``journal``: a directory where every unreadable file is recorded once (see module doc)."""

    def __init__(self, root: str | os.PathLike, *, index_cache=False, wait_for_index: bool = False,
                 journal: str | os.PathLike | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist (or is not a directory). Expected "
                f"the ImageFolder layout {self.root}/<class_name>/<image>.jpg; set it with "
                f"data.path (leave data.path unset for the built-in synthetic dataset).")
        index = load_index(self.root, IMG_EXTENSIONS, cache=index_cache, wait=wait_for_index)
        self.index_source = index.source  # "listed" or "cache" (what start-up cost)
        self.classes = index.classes
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        base = str(self.root)
        self.samples: list[tuple[str, int]] = [(os.path.join(base, rel), c)
                                               for rel, c in index.samples]
        self.journal = journal
        if not self.samples:
            hint = ""
            if (self.root / "train").is_dir():
                hint = f" (it has a train/ folder: did you mean {self.root / 'train'}?)"
            raise ValueError(
                f"empty dataset: no images ({', '.join(IMG_EXTENSIONS)}) found under "
                f"{self.root}/<class_name>/{hint}. Expected the ImageFolder layout "
                f"{self.root}/<class_name>/<image>.jpg; set it with data.path.")
        self.targets = [t for _, t in self.samples]
        self.bad_files: list[tuple[str, str]] = []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def read_bytes(self, i: int) -> bytes:
        with open(self.samples[i][0], "rb") as f:
            return f.read()

    def name(self, i: int) -> str:
        """What reports call sample ``i`` (its path)."""
        return self.samples[i][0]

    def load(self, i: int, decode: Callable[[bytes], object] | None = None):
        """Sample ``i`` decoded by ``decode(bytes)`` (default: ``decode_rgb``, a PIL RGB image),
        or None (with a warning, recorded once) if it cannot be read or decoded."""
        if i in self._bad:
            return None
        try:
            return (decode or decode_rgb)(self.read_bytes(i))
        except Exception as e:  # noqa: BLE001 - any decoder failure must not kill a worker
            self._mark_bad(i, f"{type(e).__name__}: {e}")
            return None

    def _mark_bad(self, i: int, reason: str) -> None:
        path = self.name(i)
        self._bad.add(i)
        self.bad_files.append((path, reason))
        _BAD_FILES[path] = reason
        if self.journal is not None:
            record_in_journal(self.journal, path, reason)
        warnings.warn(f"skipping unreadable image file {path} ({reason})", RuntimeWarning,
                      stacklevel=3)

    def candidates(self, i: int) -> Iterator[int]:
        """``i``, then the following indices (cyclically), skipping files known unreadable."""
        n = len(self.samples)
        for k in range(n):
            j = (i + k) % n
            if j not in self._bad:
                yield j
        raise RuntimeError(f"every image under {self.root} is unreadable; see the warnings "
                           f"above (first: {self.bad_files[:1]})")

    def load_good(self, i: int, decode=None) -> tuple[object, int]:
        """Image ``i``, or if it is unreadable the next readable one: ``(image, index_used)``."""
        for j in self.candidates(i):
            img = self.load(j, decode)
            if img is not None:
                return img, j
        raise AssertionError("unreachable: candidates() raises when every file is unreadable")

    def verify(self) -> list[tuple[str, str]]:
        """Decode every file once in this process; return the unreadable ones."""
        for i in range(len(self.samples)):
            self.load(i)
        return list(self.bad_files)

    def __repr__(self) -> str:
        return f"SafeImageFolder({self.root}, {len(self.samples)} images, " \
               f"{len(self.classes)} classes)"


# ----------------------------------------------------------------------------- seeding


def parse_key(key) -> tuple[int, int]:
    """``(index, seed)`` from a sampler key: a pair, or a plain int (then seed = index)."""
    if isinstance(key, (tuple, list)) and len(key) == 2:
        index, seed = int(key[0]), int(key[1])
    elif isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.numel() == 1):
        index = int(key)
        seed = index
    else:
        raise TypeError(f"dataset key must be an int index or an (index, seed) pair, got {key!r}")
    if seed < 0:
        raise ValueError(f"sample seed must be >= 0, got {seed}")
    return index, seed


@contextmanager
def seeded(seed: int) -> Iterator[np.random.Generator]:
    """Seed python ``random``, numpy's legacy and torch's CPU generator from ``seed``; yield a
    fresh ``np.random.Generator`` (for the masker); restore all previous states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    ss = np.random.SeedSequence(seed)
    # Independent streams per library (one seed for all would correlate them needlessly).
    w = ss.generate_state(4, dtype=np.uint32)
    random.seed(int(w[0]))
    np.random.seed(int(w[1]))
    # Only the CPU generator: torch.manual_seed would also queue CUDA/XPU re-seeds (with a
    # captured stack trace, ~0.5 ms) and transforms run on CPU anyway.
    torch.default_generator.manual_seed((int(w[2]) << 32) | int(w[3]))
    try:
        yield np.random.default_rng(ss.spawn(1)[0])
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


# ----------------------------------------------------------------------------- datasets


class _KeyedDataset(Dataset):
    """A folder (``SafeImageFolder`` or ``shards.ShardFolder``) + a stage transform.

    A transform may define ``decode(bytes)``: then the folder hands it the encoded bytes and it
    decodes only what the sample needs (see transforms.py), inside the folder's error
    handling; otherwise it gets a decoded PIL RGB image."""

    def __init__(self, folder, transform: Callable):
        self.folder = folder if hasattr(folder, "load") else SafeImageFolder(folder)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def _index(self, index: int) -> int:
        n = len(self.folder)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {len(self.folder)} images")
        return index % n

    def _sample(self, key, make: Callable):
        """``make(image, index_used, rng)`` for the first readable file from the key's index on.

        Each attempt is seeded afresh from the key, so a substitute's sample does not depend
        on whether this process already knew the skipped file was bad (worker independence)."""
        index, seed = parse_key(key)
        decode = getattr(self.transform, "decode", None)
        for j in self.folder.candidates(self._index(index)):
            with seeded(seed) as rng:
                img = self.folder.load(j, decode)
                if img is not None:
                    return make(img, j, rng)
        raise AssertionError("unreachable: candidates() raises when every file is unreadable")


class MIMDataset(_KeyedDataset):
    """key -> ``(img_224 uint8 [3,224,224], img_112 uint8 [3,112,112], mask bool[196])``.

    Images travel as uint8 (see transforms.py); ``to_float_image`` converts them on the device.

    ``masker(rng) -> np.ndarray[bool] (14, 14)`` (``beit_scale.data.masking.MaskingGenerator``).

    With a ``gpu_decode.DeviceDecode`` transform (data.decode=cuda): ``(Encoded, mask)``; the
    task decodes the two views on the device (gpu_decode.py).
    """

    def __init__(self, folder, transform, masker: Callable[[np.random.Generator], np.ndarray]):
        super().__init__(folder, transform)
        self.masker = masker

    def __getitem__(self, key):
        def make(img, _j, rng):
            views = self.transform(img)
            mask = torch.from_numpy(np.asarray(self.masker(rng), dtype=bool).reshape(-1).copy())
            if not isinstance(views, tuple):  # data.decode=cuda: one Encoded, decoded on the device
                return views, mask
            return (*views, mask)
        return self._sample(key, make)


class TokenizerDataset(_KeyedDataset):
    """key -> ``(img_112 uint8,)`` for training the dVAE (``to_float_image(x, False)``: [0,1])."""

    def __getitem__(self, key):
        return self._sample(key, lambda img, _j, _rng: (self.transform(img),))


class ClassifyDataset(_KeyedDataset):
    """key -> ``(img uint8, label)``; a bad file's substitute brings its own label.

    The classifier sees ``to_float_image(img, normalize=True)`` (ImageNet normalisation)."""

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)

    def __getitem__(self, key):
        return self._sample(key, lambda img, j, _rng: (self.transform(img),
                                                       self.folder.samples[j][1]))


# ----------------------------------------------------------------------------- helpers


def resolve_data_root(path: str | os.PathLike | None) -> Path:
    """``data.path`` -> dataset root (with train/ and val/). None or "synthetic" means the
    embedded synthetic set (generated on first use, cached)."""
    if path is None or str(path) == "synthetic":
        from .synthetic import ensure_synthetic_imagefolder
        return ensure_synthetic_imagefolder()
    return Path(path).expanduser()


def build_dataset(stage: str, root: str | os.PathLike | None, split: str = "train", *,
                  masker=None, input_size: int = 224, second_input_size: int = 112,
                  patch_size: int = 16, **transform_kwargs) -> Dataset:
    """One-call construction: ``stage`` in {"tokenizer", "mim", "classify"};
    ``root/split`` must be an ImageFolder; extra kwargs go to the stage's transform.
    ``patch_size`` (the model's) sets the mask grid, ``input_size // patch_size``, when no
    ``masker`` is given."""
    from .transforms import ClassifyTransform, MIMTransform, TokenizerTransform
    folder = SafeImageFolder(resolve_data_root(root) / split)
    if stage == "mim":
        if masker is None:
            from .masking import MaskingGenerator
            grid = input_size // patch_size
            # BEiT masks 75 of 196 patches (~40%); keep that fraction for other grids.
            masker = MaskingGenerator(input_size=(grid, grid),
                                      num_masking_patches=max(1, round(grid * grid * 75 / 196)))
        return MIMDataset(folder, MIMTransform(input_size, second_input_size,
                                               **transform_kwargs), masker)
    if stage == "tokenizer":
        return TokenizerDataset(folder, TokenizerTransform(second_input_size, **transform_kwargs))
    if stage == "classify":
        return ClassifyDataset(folder, ClassifyTransform(split == "train", input_size,
                                                         **transform_kwargs))
    raise ValueError(f"unknown stage {stage!r}: expected 'tokenizer', 'mim' or 'classify'")
