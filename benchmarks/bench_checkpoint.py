"""Checkpoint save/load time: CheckpointManager (DeepSpeed engine files + per-rank JSON + manifest
with CRC32 + COMPLETE) against a plain torch.save / torch.load of the same model and optimizer
state dicts, in one process, interleaved, to the same disk.

    .venv/bin/python benchmarks/bench_checkpoint.py [--model beit_base_patch16_224] [--zero 0] [--repeats 3]
                                                    [--dir /tmp/bench_ckpt]

One real 1-rank DeepSpeed engine (fp32, AdamW states populated by one training step).  "ours save"
is CheckpointManager.save as a periodic save runs it (retention off, so no deletes are timed): the
time training is blocked, i.e. every rank's files written; "ours save+finalize" adds rank 0's
background finalization (CRC32 of every file, manifest, COMPLETE), i.e. until the checkpoint is
complete.  Both sides write new files every repeat.  "ours load" is what a resume
does: select_resume (checks every file against the manifest, CRC32 included) + load.  "plain
load" is torch.load(weights_only=True) + load_state_dict of model and optimizer.  Medians of
--repeats; the breakdown says where our extra time goes (DeepSpeed's own save, the CRC32 pass,
the small fsync'ed JSON writes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(model_name: str, zero: int):
    import torch
    import torch.nn.functional as F
    from beit_scale.models.zoo import build_model
    from beit_scale.train.optim import build_optimizer_and_schedule, param_groups
    from beit_scale.train.engine import build_engine, init_distributed
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        os.environ.setdefault(k, v)
    init_distributed()
    torch.manual_seed(0)
    model = build_model(model_name, task="mim", drop_path_rate=0.0)
    opt, sched = build_optimizer_and_schedule(param_groups(model, 0.05), 1e-3, (0.9, 0.999), 1e-8,
                                              warmup_steps=1, max_steps=100, min_lr=1e-5)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 3.0,
          "zero_optimization": {"stage": zero}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine = build_engine(model, opt, sched, ds)
    # One step so that AdamW's exp_avg / exp_avg_sq exist for every parameter.
    x = torch.randn(1, 3, 224, 224)
    mask = torch.zeros(1, model.cfg.num_patches, dtype=torch.bool)
    mask[:, ::3] = True
    logits = engine(x, mask)
    loss = F.cross_entropy(logits, torch.randint(0, model.cfg.vocab_size, (logits.shape[0],)))
    engine.backward(loss)
    engine.step()
    return engine


class StubTrainer:
    """What CheckpointManager needs from the trainer."""

    def __init__(self):
        self.step, self.samples_seen, self.epoch, self.offset = 0, 0, 0, 0

    def state_dict(self):
        return {"step": self.step, "samples_seen": self.samples_seen, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, s):
        self.step, self.samples_seen, self.epoch, self.offset = s["step"], s["samples_seen"], s["epoch"], s["offset"]


class Timers:
    """Wraps a few functions to attribute CheckpointManager.save time to its parts."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0
        setattr(obj, name, timed)

    def pop(self) -> dict[str, float]:
        t, self.t = self.t, {}
        return t


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="beit_base_patch16_224")
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/bench_ckpt")
    args = ap.parse_args(argv)

    import torch
    import beit_scale.train.checkpoint.manager as ck
    from beit_scale.config import CheckpointCfg

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    engine = build(args.model, args.zero)
    n_params = sum(p.numel() for p in engine.module.parameters())
    print(f"{args.model} MIM, {n_params / 1e6:.1f}M params, ZeRO {args.zero}, fp32, 1 rank "
          f"(engine + one step: {time.perf_counter() - t0:.0f}s)", flush=True)

    timers = Timers()
    timers.wrap(ck, "file_crc32", "crc32")
    timers.wrap(ck, "_write_atomic", "json+fsync")
    timers.wrap(engine, "save_checkpoint", "deepspeed save")
    timers.wrap(engine, "load_checkpoint", "deepspeed load")

    run_dir = root / "ours"
    cfg = CheckpointCfg(keep_last=10**6, resume="auto")
    mgr = ck.CheckpointManager(run_dir, cfg, {"stage": "mim", "model": {"name": args.model}, "train": {"seed": 0}})
    trainer = StubTrainer()
    plain = root / "plain.pt"

    res = {k: [] for k in ("ours save", "ours save+finalize", "plain save", "ours load", "plain load")}
    parts = {"save": [], "load": []}
    for r in range(args.repeats):
        # --- save, interleaved: ours then plain (and plain first on odd repeats, for fairness)
        order = ["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]
        for who in order:
            # Untimed: flush the previous write's dirty pages so one save's writeback does not
            # throttle the next one (without this single saves ranged 2-8 s for both methods).
            os.sync()
            if who == "ours":
                trainer.step = r + 1
                t = time.perf_counter()
                path = mgr.save(engine, {"trainer": trainer}, wait=False)   # what a periodic save does
                res["ours save"].append(time.perf_counter() - t)
                mgr.finish()     # the background part: CRC32s, manifest, COMPLETE (training would go on)
                res["ours save+finalize"].append(time.perf_counter() - t)
                parts["save"].append(timers.pop())
            else:
                t = time.perf_counter()
                torch.save({"model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}, plain)
                res["plain save"].append(time.perf_counter() - t)
        ours_bytes, plain_bytes = dir_bytes(path), plain.stat().st_size
        # --- load
        os.sync()
        for who in order:
            if who == "ours":
                t = time.perf_counter()
                found = mgr.select_resume()
                plan = mgr.prepare_load(found, {})
                mgr.load(engine, plan, {"trainer": trainer})
                res["ours load"].append(time.perf_counter() - t)
                parts["load"].append(timers.pop())
            else:
                t = time.perf_counter()
                blob = torch.load(plain, map_location="cpu", weights_only=True)
                engine.module.load_state_dict(blob["model"])
                engine.optimizer.load_state_dict(blob["optimizer"])
                res["plain load"].append(time.perf_counter() - t)
                del blob
        # Keep one checkpoint on disk at a time (outside the timed region).  Both sides then write
        # new files: torch.save over an existing 1 GiB file first truncates it (freeing its
        # cached pages, waiting on its writeback), a cost ours never pays, since every save goes to
        # a new step folder.
        for old in mgr.complete_checkpoints()[:-1]:
            shutil.rmtree(old)
        plain.unlink()
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in res.items()), flush=True)

    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nbytes on disk: ours {ours_bytes / 2**20:.0f} MiB (all files), plain {plain_bytes / 2**20:.0f} MiB")
    print(f"median of {args.repeats}:")
    for k in res:
        print(f"  {k:<19} {med[k]:6.2f}s")
    print(f"  save ratio ours/plain {med['ours save'] / med['plain save']:.2f}x (target <= 1.3x): the time "
          f"training is blocked; a periodic save finalizes in the background")
    print(f"  save+finalize ratio ours/plain {med['ours save+finalize'] / med['plain save']:.2f}x: until the "
          f"checkpoint is complete (what end-of-run and signal saves wait for)")
    print(f"  load ratio ours/plain {med['ours load'] / med['plain load']:.2f}x")
    for kind in ("save", "load"):
        keys = sorted({k for p in parts[kind] for k in p})
        desc = ", ".join(f"{k} {statistics.median(p.get(k, 0.0) for p in parts[kind]):.2f}s" for k in keys)
        total = med["ours save+finalize" if kind == "save" else "ours load"]
        print(f"  ours {kind} breakdown (medians): {desc}; total {total:.2f}s")
    print("command: " + " ".join([sys.executable.split('/')[-1], "benchmarks/bench_checkpoint.py"] + (argv or sys.argv[1:])))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
