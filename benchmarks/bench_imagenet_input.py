"""Input pipeline cost on ImageNet-like JPEGs: ours vs the reference-style (unilm BEiT) pipeline.

    python benchmarks/bench_imagenet_input.py [--images 2000] [--samples 600] [--workers 1 2]
    python benchmarks/bench_imagenet_input.py --startup 100000      # file-list start-up, cold vs cached

Files: ``--images`` JPEGs generated once into ``--root`` (default
``$BEIT_SCALE_DATA_CACHE/imagenet_like_v1``), ImageFolder layout, 10 classes. Sizes and quality
drawn to resemble ImageNet-1k: long side 500 px for 80% of images (else 300-800), aspect 4:3
(60%), 3:2, 1:1, 16:9, portrait a quarter of the time; JPEG quality ~N(90, 3) in [75, 95];
content is multi-octave coloured noise (texture at every scale, not flat colour), tuned to
~90-130 KB at 500x375 (ImageNet's mean is ~110 KB).

Per-sample CPU cost (one process, one torch thread, the same files and keys for every
pipeline, medians of ``--repeats`` passes; process CPU time, so other jobs on a shared machine
do not inflate it), in ms per image per core:
- MIM sample (two views + blockwise mask):
  * reference: PIL decode; ColorJitter(0.4, 0.4, 0.4) on the full image, horizontal flip, one
    RandomResizedCrop box resized twice (224 bicubic, 112 lanczos), ToTensor + Normalize to
    float32 (unilm ``beit/datasets.py`` DataAugmentationForBEiT, with ToTensor for the dVAE view);
  * ours plain: ``MIMTransform(fast=False)`` (the pipeline before this benchmark: crop once per
    view in PIL, jitter both views, uint8 out);
  * ours: ``MIMTransform()`` (libjpeg-turbo decode, uint8 torch resizes, jitter once, 112 view
    from the 224 view).
- fine-tuning sample: reference RandomResizedCrop(224, bicubic) + flip + ToTensor + Normalize;
  ours ``ClassifyTransform(train=True)`` (fast path: libjpeg-turbo, uint8 torch resize) and with
  ``fast=False`` (PIL path, uint8 out). No RandAugment in either (it needs PIL; same cost both).
Then images/s of a DataLoader with N workers for the reference and ours (MIM), batch 64.

``--startup N``: a tree of N empty ``.jpg`` files (1000 classes) and the time to build
``SafeImageFolder`` from a listing (no index) vs from the cached index (fingerprint checked).
Page-cache warm in both cases: on a shared filesystem the listing is what grows.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beit_scale.data.datasets import MIMDataset, SafeImageFolder, seeded  # noqa: E402
from beit_scale.data.masking import MaskingGenerator  # noqa: E402
from beit_scale.data.transforms import ClassifyTransform, MIMTransform  # noqa: E402

NUM_CLASSES = 10
VERSION = "imagenet_like_v1"


# ----------------------------------------------------------------------------- files


def _size(rng: np.random.Generator) -> tuple[int, int]:
    long = 500 if rng.random() < 0.8 else int(rng.integers(300, 801))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 16 / 9], p=[0.6, 0.2, 0.1, 0.1])
    w, h = long, int(round(long / aspect))
    return (h, w) if rng.random() < 0.25 else (w, h)


def _texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Coloured noise summed over octaves (cells of 64 down to 1 px), amplitude ~ cell^alpha."""
    alpha = rng.uniform(0.05, 0.3)
    acc = np.zeros((h, w, 3), np.float32)
    for cell in (64, 32, 16, 8, 4, 2, 1):
        g = rng.standard_normal((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        g = 0.7 * g.mean(2, keepdims=True) + 0.3 * g  # mostly luminance, some colour
        if cell > 1:
            g = np.stack([np.asarray(Image.fromarray(g[..., c]).resize((w, h), Image.BICUBIC))
                          for c in range(3)], -1)
        acc += cell ** alpha * g[:h, :w]
    acc = (acc - acc.mean()) / (acc.std() + 1e-6)
    base = rng.uniform(60, 190, 3).astype(np.float32)
    return Image.fromarray(np.clip(base + 50 * acc, 0, 255).astype(np.uint8))


def _write_one(args) -> int:
    root, i, seed = args
    rng = np.random.default_rng([seed, i])
    w, h = _size(rng)
    q = int(np.clip(round(rng.normal(90, 3)), 75, 95))
    out = Path(root) / f"c{i % NUM_CLASSES:02d}" / f"{i:06d}.jpg"
    buf = io.BytesIO()
    _texture(rng, w, h).save(buf, "JPEG", quality=q)
    out.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def ensure_files(root: Path, n: int, procs: int, seed: int = 0) -> Path:
    marker = root / f".complete-{n}-{seed}"
    if marker.exists():
        return root
    for c in range(NUM_CLASSES):
        (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    jobs = [(str(root), i, seed) for i in range(n)]
    if procs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(procs) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=16)
    else:
        sizes = [_write_one(j) for j in jobs]
    marker.write_text("")
    print(f"generated {n} JPEGs in {time.perf_counter() - t:.0f} s: mean {np.mean(sizes) / 1e3:.0f} KB, "
          f"median {np.median(sizes) / 1e3:.0f} KB")
    return root


# ----------------------------------------------------------------------------- pipelines


def reference_mim():
    """unilm BEiT's pretraining augmentation, rebuilt from torchvision parts."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F
    pre = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip()])
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    masker = MaskingGenerator(input_size=(14, 14), num_masking_patches=75)

    def sample(data: bytes):
        img = pre(Image.open(io.BytesIO(data)).convert("RGB"))
        i, j, h, w = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        big = F.resized_crop(img, i, j, h, w, [224, 224], InterpolationMode.BICUBIC)
        small = F.resized_crop(img, i, j, h, w, [112, 112], InterpolationMode.LANCZOS)
        return norm(F.to_tensor(big)), F.to_tensor(small), masker(np.random.default_rng())
    return sample


def reference_classify():
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    t = T.Compose([T.RandomResizedCrop(224, interpolation=InterpolationMode.BICUBIC),
                   T.RandomHorizontalFlip(), T.ToTensor(),
                   T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return lambda data: t(Image.open(io.BytesIO(data)).convert("RGB"))


def ours_mim(fast: bool):
    t = MIMTransform(fast=fast)
    masker = MaskingGenerator(input_size=(14, 14), num_masking_patches=75)

    def sample(data: bytes):
        img = t.decode(data) if fast else Image.open(io.BytesIO(data)).convert("RGB")
        big, small = t(img)
        return big, small, masker(np.random.default_rng())
    return sample


def ours_classify(fast: bool):
    t = ClassifyTransform(train=True, fast=fast)
    return lambda data: t(t.decode(data) if fast else Image.open(io.BytesIO(data)).convert("RGB"))


def per_image_ms(fn, blobs: list[bytes], repeats: int) -> float:
    """Median over passes of the mean CPU ms per sample (bytes in memory: decode + transform).
    CPU time of this process (one torch thread), not wall time: on a shared machine the wall
    clock also counts the time other jobs hold the core."""
    for s, d in enumerate(blobs[:8]):
        with seeded(s):
            fn(d)
    runs = []
    for _ in range(repeats):
        t = time.process_time()
        for s, d in enumerate(blobs):
            with seeded(s):
                fn(d)
        runs.append((time.process_time() - t) / len(blobs) * 1e3)
    return statistics.median(runs)


class _RefDataset(torch.utils.data.Dataset):
    def __init__(self, folder: SafeImageFolder):
        self.folder, self.fn = folder, reference_mim()

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        return self.fn(self.folder.read_bytes(i))


def loader_rate(ds, workers: int, batches: int, batch: int = 64) -> float:
    keys = [(i % len(ds), i) for i in range(batch * (batches + 2 * max(workers, 1)))]
    sampler = keys if isinstance(ds, MIMDataset) else [k[0] for k in keys]
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                     prefetch_factor=2 if workers else None)
    it = iter(dl)
    for _ in range(max(workers, 1)):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


# ----------------------------------------------------------------------------- cores per GPU


def train_flops_per_image(model: str) -> float:
    """3 x (backbone forward + MIM head on 75 masked patches) + the frozen dVAE's forward."""
    from torch.utils.flop_counter import FlopCounterMode
    from beit_scale.models.dvae import DVAE, DVAEConfig
    from beit_scale.models.flops import count_forward_flops
    fwd = count_forward_flops(model, task="mim", mask_ratio=75 / 196)
    with torch.device("meta"):
        tok = DVAE(DVAEConfig()).eval()
        x = torch.empty(1, 3, 112, 112)
        with FlopCounterMode(display=False) as c, torch.no_grad():
            tok.get_codebook_indices(x)
    return 3 * fwd + c.get_total_flops()


def cores_table(ms_per_image: float, mfu: float) -> str:
    from beit_scale.scaling.peaks import get_gpu
    rows = ["| model | GPU (peak, precision) | img/s per GPU at {:.0%} MFU | CPU cores per GPU at "
            "{:.2f} ms/img | suggested data.num_workers |".format(mfu, ms_per_image),
            "|---|---|---|---|---|"]
    for model in ("beit_base_patch16_224", "beit_large_patch16_224"):
        flops = train_flops_per_image(model)
        for gpu, prec in (("V100-32GB", "fp16"), ("A100-80GB", "bf16"), ("H100-80GB", "bf16")):
            peak = get_gpu(gpu).peak_tflops(prec) * 1e12
            rate = mfu * peak / flops
            cores = rate * ms_per_image / 1e3
            rows.append(f"| {model} ({flops / 1e9:.0f} GFLOP/img) | {gpu} ({peak / 1e12:.0f} TFLOP/s "
                        f"{prec}) | {rate:,.0f} | {cores:.1f} | {int(np.ceil(cores * 1.2))} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- start-up


def startup(n: int, classes: int = 1000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "tree", Path(tmp) / "index"
        t = time.perf_counter()
        per = n // classes
        for c in range(classes):
            d = root / f"n{c:08d}"
            d.mkdir(parents=True)
            for k in range(per):
                (d / f"n{c:08d}_{k}.JPEG").touch()
        old = time.time() - 10
        for d in [root, *root.iterdir()]:  # settle the mtimes (the index distrusts fresh dirs)
            os.utime(d, (old, old))
        print(f"tree of {per * classes} files in {classes} classes made in {time.perf_counter() - t:.0f} s")
        for label, kw in (("no cache (list)", dict(index_cache=False)),
                          ("cold (list + write index)", dict(index_cache=cache)),
                          ("cached (read index + fingerprint)", dict(index_cache=cache)),
                          ("cached, again", dict(index_cache=cache))):
            t = time.perf_counter()
            f = SafeImageFolder(root, **kw)
            print(f"  {label:36s} {time.perf_counter() - t:7.3f} s  ({len(f)} files, from {f.index_source})")
        size = sum(p.stat().st_size for p in cache.iterdir())
        print(f"  index file: {size / 1e6:.1f} MB")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    base = os.environ.get("BEIT_SCALE_DATA_CACHE") or str(Path("~/.cache/beit_scale").expanduser())
    ap.add_argument("--root", default=str(Path(base) / VERSION))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=600, help="files timed per pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--startup", type=int, default=0, help="run only the start-up benchmark on N files")
    args = ap.parse_args()
    if args.startup:
        startup(args.startup)
        return
    torch.set_num_threads(1)
    root = ensure_files(Path(args.root), args.images, procs=min(4, os.cpu_count() or 1))
    folder = SafeImageFolder(root)
    blobs = [folder.read_bytes(i) for i in range(0, len(folder), max(1, len(folder) // args.samples))]
    kb = np.mean([len(b) for b in blobs]) / 1e3
    print(f"command: python benchmarks/bench_imagenet_input.py --images {args.images} "
          f"--samples {args.samples} --repeats {args.repeats}")
    print(f"{len(folder)} files under {root}; timing {len(blobs)} of them (mean {kb:.0f} KB), "
          f"1 torch thread, cpu_count {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    rows = [("MIM", "reference (unilm-style)", reference_mim()),
            ("MIM", "ours plain (fast=False)", ours_mim(False)),
            ("MIM", "ours", ours_mim(True)),
            ("fine-tune", "reference", reference_classify()),
            ("fine-tune", "ours plain (fast=False)", ours_classify(False)),
            ("fine-tune", "ours", ours_classify(True))]
    ms = {}
    for kind, name, fn in rows:
        ms[kind, name] = per_image_ms(fn, blobs, args.repeats)
        print(f"  {kind:9s} {name:26s} {ms[kind, name]:6.2f} ms/img/core  "
              f"({1e3 / ms[kind, name]:5.0f} img/s/core)")
    ref = ms["MIM", "reference (unilm-style)"]
    print(f"MIM: ours / reference = {ms['MIM', 'ours'] / ref:.2f} (target <= 0.5); "
          f"ours plain / reference = {ms['MIM', 'ours plain (fast=False)'] / ref:.2f}")
    print(f"fine-tune: ours / reference = {ms['fine-tune', 'ours'] / ms['fine-tune', 'reference']:.2f}")
    masker = MaskingGenerator(input_size=(14, 14), num_masking_patches=75)
    ours_ds = MIMDataset(folder, MIMTransform(), masker)
    for w in args.workers:
        r, o = loader_rate(_RefDataset(folder), w, args.batches), loader_rate(ours_ds, w, args.batches)
        print(f"  DataLoader, {w} worker(s), batch 64 (files read from disk): reference {r:6.0f} img/s, "
              f"ours {o:6.0f} img/s ({o / r:.2f}x)")
    print()
    print(cores_table(ms["MIM", "ours"], args.mfu))


if __name__ == "__main__":
    main()
