"""Masks per second of the blockwise MaskingGenerator on one core.

    python benchmarks/bench_masking.py [--count 75] [--n 20000]

Two figures: with the generator's own rng, and with a fresh ``np.random.default_rng(seed)`` per
mask (what a per-sample seeded dataset does). Target: >= 5,000 masks/s.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beit_scale.data.masking import MaskingGenerator  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=75)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gen = MaskingGenerator((args.grid, args.grid), num_masking_patches=args.count, seed=0)
    for _ in range(200):
        gen()  # warm-up

    def rate(fn):
        best = 0.0
        for _ in range(args.repeats):
            t = time.perf_counter()
            for i in range(args.n):
                fn(i)
            best = max(best, args.n / (time.perf_counter() - t))
        return best

    own = rate(lambda i: gen())
    fresh = rate(lambda i: gen(np.random.default_rng(i)))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"grid {args.grid}x{args.grid}, {args.count} masked, best of {args.repeats} x {args.n} masks, one core")
    print(f"own rng:                 {own:10.0f} masks/s")
    print(f"fresh default_rng(seed): {fresh:10.0f} masks/s")
    print("target >= 5000 masks/s:", "met" if min(own, fresh) >= 5000 else "NOT met")


if __name__ == "__main__":
    main()
