"""The launcher contract shared by every script in launch/.

    --deepspeed_config PATH   DeepSpeed JSON (parallelism, precision)       [ds_configs/zero2.json]
    --config PATH             experiment YAML (model, data, optimisation)   [embedded default]
    --run_dir DIR             where config, metrics, tensorboard, checkpoints go [runs/<stage>_<model>]
    --set dotted.key=value    repeatable overrides (win over the YAML)
    --local_rank N            passed by the deepspeed launcher (the environment is what we read)

Works under `deepspeed`, `torchrun`, `srun` and plain `python`.  Everything that can be checked
without a process group (config, data path, tokenizer vocabulary, resume target) is checked
first; a ConfigError prints one clear message and exits with status 2.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from pathlib import Path

from beit_scale.config import (ConfigError, build_config, file_precision, load_deepspeed_json,
                               merge_deepspeed_config, set_precision, to_dict)
from beit_scale.dist.device import check_precision
from beit_scale.dist.env import say_rank0
from beit_scale.train.tasks import make_task  # noqa: F401 - launch scripts and drivers call run.make_task

REPO = Path(__file__).resolve().parents[2]
CONFIG_ERROR_EXIT = 2

# The embedded default experiments (`make demo` on 2 CPU cores in well under 10 minutes: about 5
# min measured idle). The tokenizer's steps come from experiments/tokenizer_quality.py
# (docs/ablations.md, "Tokenizer quality"): 300 steps at hidden 32 / vocab 512 reconstruct with 26%
# less error and 1.7x the codes of the former 150 steps, for one more minute. 600 steps are better
# still (-37%) and fit the demo's limit, but `make test` runs the whole demo and went to 19m51s
# of its 20-minute budget with them.
EMBEDDED = {
    "tokenizer": {
        "model": {"name": "dvae"},
        "tokenizer": {"vocab_size": 512, "hidden_dim": 32, "kl_weight": 1e-3},
        "train": {"max_steps": 300, "global_batch": 32, "micro_batch": 16, "log_every": 10,
                  "image_log_every": 100, "eval_batches": 4},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 10},
    },
    "mim": {
        "model": {"name": "beit_mini", "drop_path": 0.0},
        "tokenizer": {"vocab_size": 512},
        "train": {"max_steps": 200, "global_batch": 32, "micro_batch": 16, "log_every": 10, "eval_batches": 8},
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "weight_decay": 0.05, "warmup_steps": 20},
    },
    "classify": {
        "model": {"name": "beit_mini", "drop_path": 0.1, "num_classes": 10},
        "train": {"max_steps": 200, "global_batch": 32, "micro_batch": 16, "log_every": 10, "eval_batches": 0},
        "optim": {"lr": 2e-3, "min_lr": 1e-6, "weight_decay": 0.05, "warmup_steps": 20, "layer_decay": 0.65},
    },
    # The embedded segmentation set (11 classes: background + 10 shape families), 128 px crops.
    "segment": {
        "model": {"name": "beit_mini", "drop_path": 0.1, "num_classes": 11, "img_size": 128},
        "segment": {"channels": 64, "aux_channels": 32},
        "train": {"max_steps": 200, "global_batch": 16, "micro_batch": 8, "log_every": 10, "eval_every": 100,
                  "eval_batches": 0},
        "optim": {"lr": 1e-3, "min_lr": 1e-6, "weight_decay": 0.05, "warmup_steps": 20, "layer_decay": 0.65,
                  "schedule": "poly"},
    },
}


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--deepspeed_config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--config", default=None, help="experiment YAML (optional; the default is embedded)")
    p.add_argument("--run_dir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _dist_env():
    """One view of rank/world from torchrun, deepspeed, Slurm or nothing; exported for torch."""
    from beit_scale.dist.env import detect_dist_env
    env = detect_dist_env(os.environ)
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        # One plain process still needs a rendezvous port; a fixed one collides with any other
        # job on the machine, so take a free one.
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env = dataclasses.replace(env, master_port=s.getsockname()[1])
    env.export(os.environ)
    return env


def device_plan(env):
    """This process's device: the one `setup_device` bound, else decided now (test drivers)."""
    from beit_scale.dist.device import current_plan, plan_device
    return current_plan() or plan_device(env)


def setup_device(env):
    """Choose and set this rank's device first thing: before any tensor, CUDA context or process
    group (see beit_scale/dist/device.py for why).  Raises DistConfigError (exit 2)."""
    from beit_scale.dist.device import bind_device, plan_device
    plan = plan_device(env)
    bind_device(plan)
    if plan.type == "cuda" and env.local_rank == 0:
        print(f"[device] rank {env.rank}: {plan.name} (sm_{plan.capability[0]}{plan.capability[1]}), {plan.why}",
              flush=True)
    return plan


def fit_embedded_batch(cfg, world_size: int, yaml_d: dict, set_d: dict) -> str | None:
    """The embedded defaults (global 32, micro 16) must run on 1-8 GPUs per node and more: when
    the user set neither batch key and micro x world does not divide the global batch, keep the
    global batch (the same experiment on any GPU count) with a smaller micro batch, or, where
    the world size does not divide it, round the global batch up to a multiple of it.  Returns
    the note to print, None when nothing changed."""
    t = cfg.train
    user = {k for d in (yaml_d, set_d) for k in (d.get("train") or {}) if k in ("global_batch", "micro_batch")}
    if user or t.global_batch % (t.micro_batch * world_size) == 0:
        return None
    per_rank = -(-t.global_batch // world_size)
    accum = -(-per_rank // t.micro_batch)
    while per_rank % accum:
        accum += 1
    old = (t.global_batch, t.micro_batch)
    t.global_batch, t.micro_batch = per_rank * world_size, per_rank // accum
    return (f"note: the embedded default batch (global {old[0]}, micro {old[1]}) does not divide over "
            f"{world_size} ranks: using global {t.global_batch} = micro {t.micro_batch} x {world_size} ranks x "
            f"{accum} accumulation (set train.global_batch / train.micro_batch to choose)")


def prepare(stage: str, args, env, run_dir: Path | None = None, defaults: dict | None = None,
            extra_sets: list[str] | None = None):
    """Config + DeepSpeed JSON + resume plan, all before any process group."""
    cfg, yaml_d, set_d = build_config(stage, args.config, list(args.set) + list(extra_sets or []),
                                      defaults=defaults if defaults is not None else EMBEDDED[stage])
    from beit_scale.train.guard import parse_faults
    try:
        parse_faults(cfg.guard.inject)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.config is None and defaults is None:
        note = fit_embedded_batch(cfg, env.world_size, yaml_d, set_d)
        if note:
            say_rank0(note)
    ds_raw = load_deepspeed_json(args.deepspeed_config)
    ds = merge_deepspeed_config(cfg, ds_raw, env.world_size, yaml_d, set_d)
    from beit_scale.dist.env import validate_slurm_env
    plan = device_plan(env)
    validate_slurm_env(env, os.environ, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                       use_gpus=plan.type == "cuda")
    want = file_precision(ds)
    if plan.type == "cuda":
        check_precision(want, plan)  # e.g. bf16 on a V100: an error, never a silent fallback
    else:
        from beit_scale.train.engine import device_supports
        if not device_supports(want):
            # Only where no GPU is expected (plan_device refuses CPU where one is): the demo on a laptop.
            say_rank0(f"note: the CPU cannot run {want}; running in fp32 instead")
            set_precision(ds, "fp32")
    cfg.precision = file_precision(ds)
    run_dir = Path(run_dir or args.run_dir or REPO / "runs" / f"{stage}_{cfg.model.name}")
    return cfg, ds, run_dir


def train_stage(cfg, ds, run_dir: Path, env, task=None) -> dict:
    """Resume plan, process group, engine, loop.  Returns the trainer's final metrics."""
    from beit_scale.train.checkpoint import CheckpointManager
    from beit_scale.train.engine import init_distributed
    from beit_scale.train.trainer import Trainer
    task = task or make_task(cfg)
    task.configure(run_dir=run_dir, ds_config=ds)  # preflight may check DeepSpeed settings (ZeRO stage)
    task.preflight()
    ckpt = CheckpointManager(run_dir, cfg.checkpoint, to_dict(cfg), env.rank, env.world_size)
    found = ckpt.select_resume()
    ds = copy.deepcopy(ds)
    plan = ckpt.prepare_load(found, ds) if found else None
    if found:
        say_rank0(f"resuming from {found[0]} (step {found[1]['step']})")
    init_distributed(cfg.train.dist_timeout_min)
    return Trainer(cfg, task, ds, run_dir, ckpt, plan).fit()


def main(stage: str, argv=None, description: str = "") -> int:
    args = parse_args(argv, description)
    env = _dist_env()
    from beit_scale.dist.env import DistConfigError
    try:
        setup_device(env)
        status = _main(stage, args, env)
    except (ConfigError, DistConfigError) as e:
        from beit_scale.dist.env import linger_before_error_exit
        say_rank0("error: " + " ".join(str(e).split()), err=True)
        if env.world_size > 1:  # let rank 0's message out before srun's kill-on-bad-exit
            linger_before_error_exit(1.0 if env.rank == 0 else 3.0)
        return CONFIG_ERROR_EXIT
    from beit_scale.train.engine import exit_after_run
    exit_after_run(status)  # more than one rank: does not return (see there)
    return status


def _early_exit(result: dict) -> int | None:
    """The launcher's exit status when a stage ended before finishing, None when it finished."""
    from beit_scale.train.guard import GUARD_EXIT_CODE
    from beit_scale.train.signals import DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE
    if result.get("diverged"):
        return DIVERGED_EXIT_CODE
    if result.get("guard_gave_up"):
        return GUARD_EXIT_CODE
    if result.get("stopped"):
        return REQUEUE_EXIT_CODE
    if result.get("paused"):
        return 0
    return None


def _main(stage: str, args, env) -> int:
    cfg, ds, run_dir = prepare(stage, args, env)
    tokenizer_path = None
    if stage == "mim" and cfg.mim.target == "tokens":  # pixel targets: no tokenizer to train or load
        tokenizer_path = cfg.tokenizer.checkpoint
        if not tokenizer_path:
            from beit_scale.train.tasks.tokenizer import tokenizer_path_in
            tokenizer_path = tokenizer_path_in(run_dir / "tokenizer")
            if not tokenizer_path.exists():
                # Image, patch and tokenizer grids must agree: say so now, not after training a
                # tokenizer at the wrong size.
                from beit_scale.train.tasks import MIMTask
                MIMTask(cfg, tokenizer_path).check_geometry()
                say_rank0(f"no tokenizer.checkpoint given: training the default tokenizer first in "
                          f"{tokenizer_path.parent} (cached there and reused next time)")
                status = _train_tokenizer(args, env, run_dir / "tokenizer", cfg)
                if status:
                    return status
            else:
                say_rank0(f"using the cached tokenizer {tokenizer_path}")
    task = make_task(cfg, tokenizer_path)
    status = _early_exit(train_stage(cfg, ds, run_dir, env, task))
    if status is not None:
        return status
    if stage == "tokenizer":
        _save_tokenizer_from_run(run_dir, env)
    say_rank0(final_report(run_dir))
    return 0


def _train_tokenizer(args, env, tok_dir: Path, mim_cfg) -> int:
    sets = [f"tokenizer.vocab_size={mim_cfg.tokenizer.vocab_size}",
            f"data.second_input_size={mim_cfg.data.second_input_size}",
            f"train.seed={mim_cfg.train.seed}", f"data.num_workers={mim_cfg.data.num_workers}",
            f"checkpoint.resume={mim_cfg.checkpoint.resume}"]
    if mim_cfg.data.path:
        sets.append(f"data.path={mim_cfg.data.path}")
    if mim_cfg.checkpoint.every_steps:
        sets.append(f"checkpoint.every_steps={mim_cfg.checkpoint.every_steps}")
    tok_args = argparse.Namespace(deepspeed_config=args.deepspeed_config, config=None, run_dir=str(tok_dir),
                                  set=[s for s in args.set if s.startswith("precision=")] + sets)
    cfg, ds, _ = prepare("tokenizer", tok_args, env, run_dir=tok_dir)
    result = train_stage(cfg, ds, tok_dir, env)
    if result.get("paused"):
        say_rank0("the tokenizer stage stopped early (train.stop_at_step); run again to continue")
    status = _early_exit(result)
    if status is not None:
        return status
    _save_tokenizer_from_run(tok_dir, env)
    return 0


def _save_tokenizer_from_run(run_dir: Path, env) -> None:
    """Consolidate the newest tokenizer checkpoint into the safetensors file MIM loads."""
    import torch.distributed as dist
    if env.rank == 0:
        from beit_scale.models.dvae import DVAE, DVAEConfig, save_tokenizer
        from beit_scale.train.checkpoint.reader import consolidated_state_dict
        from beit_scale.train.tasks.tokenizer import tokenizer_path_in
        from beit_scale.config import from_dict
        sd, manifest = consolidated_state_dict(run_dir)
        tcfg = from_dict(manifest["config"])
        model = DVAE(DVAEConfig(vocab_size=tcfg.tokenizer.vocab_size, image_size=tcfg.data.second_input_size,
                                hidden_dim=tcfg.tokenizer.hidden_dim))
        model.load_state_dict(sd)
        path = save_tokenizer(model, tokenizer_path_in(run_dir))  # atomic (temp file + rename)
        say_rank0(f"tokenizer saved to {path}")
    if dist.is_initialized():
        dist.barrier()


def final_report(run_dir: Path) -> str:
    lines = ["", "=" * 72, f"run dir      {run_dir}",
             f"config       {run_dir / 'config.yaml'}",
             f"metrics      {run_dir / 'metrics.jsonl'}",
             f"tensorboard  tensorboard --logdir {run_dir / 'tensorboard'}",
             f"checkpoints  {run_dir / 'checkpoints'}"]
    from beit_scale.train.viz_callbacks import PNG_NAME
    if (run_dir / PNG_NAME).exists():
        lines.append(f"predictions  {run_dir / PNG_NAME} (MIM predictions at masked patches, decoded)")
    mpath = run_dir / "metrics.jsonl"
    if mpath.exists():
        evals = [json.loads(ln) for ln in mpath.read_text().splitlines() if '"kind": "eval"' in ln]
        if evals:
            last = evals[-1]
            if "val_mim_acc" in last:
                lines.append(f"MIM accuracy {last['val_mim_acc']:.4f} on held-out masked patches vs "
                             f"{last['val_majority_acc']:.4f} for the most frequent token "
                             f"({last['val_acc_over_majority']:.2f}x)")
            if "val_pixel_mse" in last:
                lines.append(f"MIM pixels   MSE {last['val_pixel_mse']:.4f} on held-out normalized masked patches "
                             f"vs {last['val_pixel_mse_zero']:.4f} for predicting each patch's mean")
            if "val_top1" in last:
                lines.append(f"top-1        {last['val_top1']:.4f} (top-5 {last.get('val_top5', float('nan')):.4f})")
            if "val_mIoU" in last:
                lines.append(f"segmentation mIoU {last['val_mIoU']:.4f}, mAcc {last['val_mAcc']:.4f}, aAcc "
                             f"{last['val_aAcc']:.4f}; overlays {run_dir / 'segmentation_predictions.png'}")
            if "val_recon_mse" in last:
                lines.append(f"tokenizer    reconstruction MSE {last['val_recon_mse']:.5f}, "
                             f"perplexity {last['val_perplexity']:.1f}")
    lines.append("=" * 72)
    return "\n".join(lines)
