"""One training step of our BEiT-Base classifier vs timm's beit_base_patch16_224, same process.

    python benchmarks/bench_model_step.py [--batch 8] [--repeats 5] [--threads N] [--drop-path 0.1]

A step is forward + cross-entropy on random labels + backward (fp32, 224x224, train mode, same
drop-path rate in both). The two models alternate (order flipped every repeat so that a slow
phase of a shared machine hits both), after one warm-up step each. Prints per-model median and
min, the ratio ours/timm of medians (and of mins), and the spread as a noise indicator, for
wall-clock time and for process CPU time.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beit_scale.models import build_model  # noqa: E402


def step(model, x, y):
    """-> (wall seconds, process CPU seconds) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    t, c = time.perf_counter(), time.process_time()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return time.perf_counter() - t, time.process_time() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--model", default="beit_base_patch16_224")
    args = ap.parse_args()
    import timm  # imported here so that --help works without it

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = build_model(args.model, drop_path_rate=args.drop_path).train()
    ref = timm.create_model(args.model, pretrained=False, drop_path_rate=args.drop_path).train()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))

    for _ in range(args.warmup):
        step(ours, x, y)
        step(ref, x, y)
    wall = {"ours": [], "timm": []}
    cpu = {"ours": [], "timm": []}
    for r in range(args.repeats):
        order = [("ours", ours), ("timm", ref)]
        if r % 2:
            order.reverse()
        for name, model in order:
            w, c = step(model, x, y)
            wall[name].append(w)
            cpu[name].append(c)

    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
          f"model {args.model} ({n_ours:,} params ours, {n_ref:,} timm), batch {args.batch}, fp32, "
          f"drop_path {args.drop_path}, {args.warmup} warm-up + {args.repeats} interleaved repeats")
    # Wall time is what a user sees; process CPU time is far less sensitive to other jobs on a
    # shared machine (with --threads 1 it is close to the uncontended compute time).
    for clock, times in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        mins = {k: min(v) for k, v in times.items()}
        for k in ("ours", "timm"):
            v = times[k]
            print(f"{clock:>4} {k:>4}: median {med[k]:7.3f} s  min {mins[k]:7.3f} s  max {max(v):7.3f} s  "
                  f"spread (max/min) {max(v) / min(v):5.2f}   all: {' '.join(f'{t:.3f}' for t in v)}")
        print(f"{clock:>4} ratio ours/timm: median {med['ours'] / med['timm']:.3f}   "
              f"min {mins['ours'] / mins['timm']:.3f}")


if __name__ == "__main__":
    main()
