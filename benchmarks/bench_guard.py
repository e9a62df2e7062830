"""What the divergence guard (beit_scale/train/guard.py) costs per training step: the real trainer
on the beit_small MIM step, CPU, fp32, guard on vs off, interleaved.

    .venv/bin/python benchmarks/bench_guard.py [--model beit_small] [--batch 4] [--steps 6] [--pairs 3]

One process, a 1-rank gloo process group (the guard's per-step all-reduce and host sync are
real), the real launcher path (run.prepare -> CheckpointManager -> Trainer), the embedded
synthetic data, an untrained dVAE tokenizer (vocabulary 8192) for the targets.  Runs alternate
on/off/off/on/... so drift of a shared machine hits both sides alike.  Two figures:
- the guard's own time per step (measured inside Guard.after_step: the all-reduce, the host
  sync, the detector), as a share of the median step time: the precise one;
- the ratio of the median step times of the guard-on and guard-off runs (first `--warmup` steps
  of each run dropped): end to end, but only as good as the machine's noise.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_run(a, enabled: bool, run_dir: Path, tokenizer: Path) -> tuple[list[float], float, int]:
    """(per-step times of the run after warm-up, guard seconds per step, steps timed)."""
    import argparse as ap
    from beit_scale.config import to_dict
    from beit_scale.train import run
    from beit_scale.train.checkpoint import CheckpointManager
    from beit_scale.train.engine import init_distributed
    from beit_scale.train.trainer import Trainer
    sets = [f"model.name={a.model}", "model.drop_path=0.0", f"tokenizer.checkpoint={tokenizer}",
            "tokenizer.vocab_size=8192", f"train.max_steps={a.steps}", f"train.global_batch={a.batch}",
            f"train.micro_batch={a.batch}", "train.log_every=1", "train.eval_batches=1", "data.num_workers=0",
            "precision=fp32", f"guard.enabled={str(enabled).lower()}", "checkpoint.resume=none",
            "checkpoint.overwrite=true"]
    env = run._dist_env()
    args = ap.Namespace(deepspeed_config=str(REPO / "ds_configs" / "zero2.json"), config=None,
                        run_dir=str(run_dir), set=sets)
    cfg, ds, run_dir = run.prepare("mim", args, env)
    task = run.make_task(cfg, cfg.tokenizer.checkpoint)
    task.configure(run_dir=run_dir, ds_config=ds)
    ckpt = CheckpointManager(run_dir, cfg.checkpoint, to_dict(cfg), env.rank, env.world_size)
    init_distributed(cfg.train.dist_timeout_min)
    trainer = Trainer(cfg, task, ds, run_dir, ckpt)
    times = []
    step_end = trainer._train_step

    def timed():  # the loop's own step, timed from outside (logging and saving are not in it)
        t0 = time.perf_counter()
        out = step_end()
        times.append(time.perf_counter() - t0)
        return out
    trainer._train_step = timed
    trainer.fit()
    guard_s = trainer.guard.seconds if trainer.guard is not None else 0.0
    kept = times[a.warmup:]
    return kept, guard_s / max(len(times), 1), len(kept)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="beit_small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3)
    a = p.parse_args(argv)
    import torch
    from beit_scale.models.dvae import DVAE, DVAEConfig, save_tokenizer
    from beit_scale.train.engine import shutdown_distributed
    tmp = Path(tempfile.mkdtemp(prefix="bench_guard_"))
    torch.manual_seed(0)
    tok = save_tokenizer(DVAE(DVAEConfig(vocab_size=8192, image_size=112, hidden_dim=64)), tmp / "tok.safetensors")
    step_times = {True: [], False: []}
    guard_per_step = []
    order = [i % 4 in (0, 3) for i in range(2 * a.pairs)]  # on, off, off, on, on, off, ...
    for i, enabled in enumerate(order):
        kept, g, n = one_run(a, enabled, tmp / f"run{i}", tok)
        step_times[enabled].append(statistics.median(kept))
        if enabled:
            guard_per_step.append(g)
        print(f"run {i}: guard {'on ' if enabled else 'off'} median step {statistics.median(kept):.3f} s "
              f"over {n} steps" + (f", guard {g * 1e3:.3f} ms/step" if enabled else ""), flush=True)
    shutdown_distributed()
    on, off = statistics.median(step_times[True]), statistics.median(step_times[False])
    g = statistics.median(guard_per_step)
    cmd = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"\n{cmd}\n{a.model} MIM, batch {a.batch}, CPU fp32, {torch.get_num_threads()} threads, "
          f"{a.pairs} on/off pairs x {a.steps} steps (first {a.warmup} dropped)")
    print(f"guard's own work: {g * 1e3:.3f} ms/step = {100 * g / off:.3f} % of the {off:.3f} s step")
    print(f"median step: on {on:.3f} s, off {off:.3f} s, ratio on/off {on / off:.4f}")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
