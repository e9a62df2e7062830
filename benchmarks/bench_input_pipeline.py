"""Does the input pipeline keep up with MIM pretraining? Images/s delivered vs consumed.

    python benchmarks/bench_input_pipeline.py [--model beit_debug] [--batch 8] [--workers N]

Delivered: a DataLoader over ``MIMDataset`` (decode JPEG, one crop/flip/jitter, 224 + 112 views,
blockwise mask), ``--workers`` processes (default min(4, cpu_count)), keyed ``(index, seed)``.
Consumed: one MIM training step of ``build_model(--model, task='mim')``: the frozen dVAE
tokenizer's forward on the 112 views (default DVAEConfig, vocab = the model's vocab), the
model's forward + backward + AdamW step. Each side is timed alone, one after the other; the
ratio delivered/consumed should be >= 3 so the loader is never the bottleneck (on a shared
2-core machine both sides compete for the same cores during real training, so the ratio is an
upper bound there). Uses the embedded synthetic dataset (generated on first use).

Also printed: the bytes one batch occupies in shared memory on its way from a worker to the
training process (uint8 images + bool mask, as shipped) against the float32 images the
pipeline shipped before, and what that means at --shm_workers x prefetch 4 batches of
--shm_batch images in flight per rank.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beit_scale.data import MIMDataset, MIMTransform, ensure_synthetic_imagefolder, to_float_image  # noqa: E402
from beit_scale.data.masking import MaskingGenerator  # noqa: E402
from beit_scale.models.dvae import DVAE, DVAEConfig  # noqa: E402
from beit_scale.models.zoo import build_model  # noqa: E402


def loader_rate(ds, batch, workers, batches):
    keys = [(i % len(ds), i) for i in range(batch * (batches + 2 * max(workers, 1)))]
    dl = DataLoader(ds, batch_size=batch, sampler=keys, num_workers=workers,
                    persistent_workers=False, prefetch_factor=4 if workers else None)
    it = iter(dl)
    for _ in range(max(workers, 1)):  # warm-up: workers started, first batches decoded
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)[0].shape[0]
    return n / (time.perf_counter() - t)


def step_rate(model_name, batch, steps, example):
    torch.manual_seed(0)
    model = build_model(model_name, task="mim")
    tok = DVAE(DVAEConfig(vocab_size=model.cfg.vocab_size)).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    img224, img112, mask = (t[:batch] for t in example)
    # What the tasks do on the device: uint8 -> float (ImageNet-normalised for the backbone).
    img224, img112 = to_float_image(img224, normalize=True), to_float_image(img112, normalize=False)

    def step():
        with torch.no_grad():
            target = tok.get_codebook_indices(img112).flatten(1)[mask]
        loss = F.cross_entropy(model(img224, mask), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    full = batch * steps / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
        tok.get_codebook_indices(img112)
    tok_only = batch * steps / (time.perf_counter() - t)
    return full, tok_only


def batch_bytes(example, batch):
    """(bytes of one batch as shipped, bytes with float32 images as before)."""
    img224, img112, mask = (t[:batch] for t in example)
    shipped = sum(t.numel() * t.element_size() for t in (img224, img112, mask))
    before = (img224.numel() + img112.numel()) * 4 + mask.numel() * mask.element_size()
    return shipped, before


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="beit_debug")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shm_batch", type=int, default=64, help="batch size for the shared-memory figure")
    ap.add_argument("--shm_workers", type=int, default=10, help="workers for the shared-memory figure")
    args = ap.parse_args()

    root = ensure_synthetic_imagefolder()
    ds = MIMDataset(root / "train", MIMTransform(),
                    MaskingGenerator(input_size=(14, 14), num_masking_patches=75))
    delivered = loader_rate(ds, args.batch, args.workers, args.batches)
    example = next(iter(DataLoader(ds, batch_size=args.batch, sampler=[(i, i) for i in
                                                                      range(args.batch)])))
    big = next(iter(DataLoader(ds, batch_size=args.shm_batch,
                               sampler=[(i % len(ds), i) for i in range(args.shm_batch)])))
    shipped, before = batch_bytes(big, args.shm_batch)
    consumed, tok_only = step_rate(args.model, args.batch, args.steps, example)
    print(f"command: python benchmarks/bench_input_pipeline.py --model {args.model} "
          f"--batch {args.batch} --workers {args.workers}")
    print(f"torch threads {torch.get_num_threads()}, cpu_count {os.cpu_count()}")
    print(f"delivered by DataLoader(MIMDataset, {args.workers} workers): {delivered:8.1f} img/s")
    print(f"consumed by one {args.model} MIM step (+ dVAE tokenizer fwd): {consumed:8.1f} img/s")
    print(f"  (the dVAE tokenizer forward alone: {tok_only:8.1f} img/s)")
    inflight = args.shm_workers * 4
    print(f"shared memory per batch of {args.shm_batch} (224 + 112 views + mask): {shipped / 1e6:.2f} MB as "
          f"uint8 vs {before / 1e6:.2f} MB as float32 ({before / shipped:.2f}x); "
          f"{args.shm_workers} workers x prefetch 4 in flight: {inflight * shipped / 1e9:.2f} GB vs "
          f"{inflight * before / 1e9:.2f} GB per rank")
    ratio = delivered / consumed
    print(f"ratio delivered/consumed: {ratio:.2f}x (target >= 3x) "
          f"{'OK' if ratio >= 3 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
