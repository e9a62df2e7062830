"""A tiny stand-in for launch/pretrain.py, to test the Slurm mechanics without a model.

Same command-line contract as the real entry point, so the project's own sbatch scripts run it
unchanged (ENTRY=tests/slurm_payload.py):
    python tests/slurm_payload.py --deepspeed_config X --config Y --run_dir DIR \
        --set train.max_steps=N --set train.global_batch=4 --set train.micro_batch=2 \
        --set checkpoint.every_steps=K [--set payload.step_seconds=0.3]

What it does, like the real trainer: derive the rank layout with beit_scale.dist, validate it
before any process group, join one gloo world (env://), run "steps" that each do an all_reduce,
append one JSON line per step to DIR/metrics.jsonl (rank 0), and implement the preemption
protocol: on SIGUSR1/SIGTERM finish the step in flight, checkpoint (DIR/ckpt.json), exit 3;
on start, resume after the checkpointed step.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from beit_scale.dist import (REQUEUE_EXIT_CODE, DistConfigError, detect_dist_env,  # noqa: E402
                             fail_fast, validate_slurm_env)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--deepspeed_config")
    p.add_argument("--config")
    p.add_argument("--run_dir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = p.parse_args(argv)
    sets = dict(s.split("=", 1) for s in args.set)
    args.max_steps = int(sets.get("train.max_steps", 10))
    args.global_batch = int(sets.get("train.global_batch", 4))
    args.micro_batch = int(sets.get("train.micro_batch", 2))
    args.every = int(sets.get("checkpoint.every_steps", 0))
    args.step_seconds = float(sets.get("payload.step_seconds", 0.2))
    return args


def save_ckpt(run_dir: Path, step: int) -> None:
    tmp = run_dir / "ckpt.json.tmp"
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, run_dir / "ckpt.json")  # atomic: a half-written save is never seen


def main(argv=None) -> int:
    args = parse_args(argv)
    env = detect_dist_env()
    try:
        validate_slurm_env(env, global_batch=args.global_batch, micro_batch=args.micro_batch,
                           use_gpus=False)
    except DistConfigError as e:
        fail_fast(e, env)
    env.export(os.environ)
    print(env.describe(), f"host={socket.gethostname()} slurm_node={os.environ.get('SLURMD_NODENAME')}",
          flush=True)

    stop = {"sig": 0}

    def on_signal(signum, frame):  # only set a flag: the step in flight must finish
        stop["sig"] = signum
        print(f"rank {env.rank}: got signal {signum}, will checkpoint after this step", flush=True)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://")
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "world").mkdir(exist_ok=True)
    (run_dir / "world" / f"rank{env.rank}.json").write_text(json.dumps({
        **env.as_dict(), "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "allreduce_sum": t.item(), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}))

    ckpt = run_dir / "ckpt.json"
    start = json.loads(ckpt.read_text())["step"] + 1 if ckpt.exists() else 1
    if env.is_main and start > 1:  # same wording as the trainer: the test compares the steps
        print(f"resumed from {ckpt} at step {start - 1}", flush=True)

    for step in range(start, args.max_steps + 1):
        time.sleep(args.step_seconds)  # the "work"
        x = torch.tensor([float(step)])
        dist.all_reduce(x)  # every rank must be at the same step
        assert x.item() == step * env.world_size, "ranks out of step"
        if env.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "world_size": env.world_size,
                                    "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
        # agree on stopping: a signal may reach the ranks in different steps
        flag = torch.tensor([float(stop["sig"] != 0)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 or (args.every and step % args.every == 0) or step == args.max_steps:
            if env.is_main:
                save_ckpt(run_dir, step)
            dist.barrier()  # the checkpoint is complete before anyone exits
        if flag.item() > 0 and step < args.max_steps:
            if env.is_main:
                why = signal.Signals(stop["sig"]).name if stop["sig"] else "a signal on another rank"
                print(f"received {why}: saved step {step}; exiting with status "
                      f"{REQUEUE_EXIT_CODE}", flush=True)
            dist.destroy_process_group()
            return REQUEUE_EXIT_CODE

    if env.is_main:
        print(f"finished {args.max_steps} steps", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
