"""Test driver: several trainings through the real launcher path in ONE process group.

Usage (under tests.launching.start_ranks or torchrun):
    python tests/drivers/multi_run.py SPEC.json
SPEC: {"fp16_on_cpu": bool, "runs": [{"stage", "deepspeed_config", "run_dir", "set": [...],
       "overflow_at": [steps]}]}

Starting DeepSpeed costs seconds per process; sharing one start-up across the runs keeps the
suite fast.  `fp16_on_cpu` is the TEST-ONLY switch from ENVIRONMENT.md that lets DeepSpeed's
real fp16 path (loss scaling included) run on a CPU; the product never sets it.
`overflow_at` multiplies the loss by inf at those steps to inject a gradient overflow.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("fp16_on_cpu"):
        from deepspeed.accelerator import get_accelerator
        type(get_accelerator()).is_fp16_supported = lambda self: True
    from beit_scale.train import run
    env = run._dist_env()
    for r in spec["runs"]:
        args = argparse.Namespace(deepspeed_config=r["deepspeed_config"], config=r.get("config"),
                                  run_dir=r["run_dir"], set=r.get("set", []))
        cfg, ds, run_dir = run.prepare(r["stage"], args, env)
        task = run.make_task(cfg, cfg.tokenizer.checkpoint)
        bad = set(r.get("overflow_at", []))
        if bad:
            step_fn = task.step

            def step(engine, batch, step, _f=step_fn):
                loss, m = _f(engine, batch, step)
                return (loss * float("inf") if step in bad else loss), m
            task.step = step
        result = run.train_stage(cfg, ds, run_dir, env, task)
        status = run._early_exit(result)
        if status:  # the launcher's exit status (diverged 4, guard gave up 5); the peers agree
            from beit_scale.train.engine import shutdown_distributed
            shutdown_distributed()
            sys.exit(status)
    from beit_scale.train.engine import shutdown_distributed
    shutdown_distributed()


if __name__ == "__main__":
    main()
