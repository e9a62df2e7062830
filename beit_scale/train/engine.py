"""The engine module: everything that wraps a plain model for distributed training, and the
one place in the library that imports DeepSpeed (tests/test_layers.py checks that).

1. `apply_activation_checkpointing(model, policy, impl)`: recompute chosen blocks in backward.
2. `init_distributed(timeout)`, `build_engine(model, optimizer, scheduler, ds_config, device)`: the
   process group and the DeepSpeed engine (ZeRO 0-3, offload, fp16 loss scaling / bf16, gradient
   clipping) from the DeepSpeed JSON, on the device this rank chose (beit_scale/dist/device.py).
3. What the rest of the code asks of an engine beyond its own methods: loss scale, grad norm,
   scheduler lag, the min-loss-scale abort, the full state dict, the optimizer class, ZeRO
   checkpoint consolidation and the universal-checkpoint key.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.utils.checkpoint as torch_ckpt

log = logging.getLogger(__name__)


def blocks_to_checkpoint(num_blocks: int, policy: str) -> list[int]:
    if policy == "none":
        return []
    if policy == "all":
        return list(range(num_blocks))
    every = int(policy.split("_", 1)[1])
    return [i for i in range(num_blocks) if i % every == 0]


def apply_activation_checkpointing(model: torch.nn.Module, policy: str, impl: str = "torch") -> list[int]:
    """Wrap `model.blocks[i].forward` for the chosen blocks; returns their indices.

    The wrap is on the instance's `forward`, so parameter names and state dicts are unchanged
    (checkpoints stay interchangeable between runs with and without checkpointing).
    """
    chosen = blocks_to_checkpoint(len(model.blocks), policy)
    if not chosen:
        return chosen
    if impl == "deepspeed":
        import deepspeed
        ckpt_fn = deepspeed.checkpointing.checkpoint
    else:
        # use_reentrant=False: works when the block input does not require grad and with
        # keyword arguments (the shared relative-position bias is passed as one).
        ckpt_fn = functools.partial(torch_ckpt.checkpoint, use_reentrant=False)
    for i in chosen:
        blk = model.blocks[i]
        inner = blk.forward

        def forward(x, rel_pos_bias=None, _inner=inner):
            if not torch.is_grad_enabled():
                return _inner(x, rel_pos_bias=rel_pos_bias)
            if impl == "deepspeed":
                # DeepSpeed's checkpoint takes positional tensors only.
                return ckpt_fn(lambda a, b: _inner(a, rel_pos_bias=b), x, rel_pos_bias)
            return ckpt_fn(_inner, x, rel_pos_bias=rel_pos_bias)

        blk.forward = forward
    return chosen


def device_supports(precision: str) -> bool:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if precision == "fp16":
        return bool(acc.is_fp16_supported())
    if precision == "bf16":
        return bool(acc.is_bf16_supported())
    return True


def init_distributed(timeout_minutes: float = 60.0) -> None:
    """The process group (NCCL on GPUs, gloo on CPU).  The timeout bounds how long a collective
    waits for a late rank: long enough for 64 ranks to scan an ImageNet folder on a shared
    filesystem before the first collective (train.dist_timeout_min)."""
    import datetime

    import deepspeed
    import torch.distributed as dist
    if not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator
        if get_accelerator().device_name() == "cpu":
            # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce at start: a minute of
            # compiling on 2 cores, and a lock left by a killed run blocks every later start.
            # Plain gloo is what CPU runs (tests, demo) need.
            import deepspeed.ops
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False, timeout=datetime.timedelta(minutes=timeout_minutes))


def shutdown_distributed() -> None:
    """Leave the process group together and tear it down before the interpreter exits.

    Left to interpreter shutdown, gloo's C++ threads can be destroyed while still joinable when
    a peer has already gone, and the process aborts ("terminate called without an active
    exception", status -6) after a run that succeeded.  Only for the normal way out: after an
    error the peers may be gone, and a barrier would hang.
    """
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_after_run(status: int) -> None:
    """The launcher's way out after a run that returned normally (finished, paused, or stopping for
    a requeue, with every rank agreeing). With more than one rank: a barrier, flush, then
    ``os._exit(status)``. Why not the interpreter's exit: even after ``destroy_process_group``,
    DeepSpeed keeps references to process groups whose gloo threads are destroyed during
    interpreter shutdown, and a rank whose peer has already gone then aborts ("terminate called
    without an active exception", status -6) after a run that succeeded (seen in
    test_elastic_resume_2_to_1_to_2 on the 2-core CI VM). The trainer has already closed its
    metrics file and tensorboard writer and joined the checkpoint finalizer. One rank: the normal
    teardown, and return."""
    import logging
    import os
    import sys

    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        shutdown_distributed()
        return
    dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def optimizer_class(ds_config: dict):
    """AdamW, or DeepSpeed's CPU Adam when the optimizer state is offloaded to CPU (DeepSpeed
    refuses a torch optimizer there unless zero_force_ds_cpu_optimizer is false)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu" and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam
    return torch.optim.AdamW


def fp32_state_dict_from_zero_checkpoint(checkpoints_dir, tag: str) -> dict:
    """The full fp32 weights of a ZeRO 1-3 checkpoint, merged from every rank's partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)


def universal_checkpoint_client_state() -> dict:
    """client_state carrying the key DeepSpeed's universal-checkpoint converter requires for
    ZeRO 1/2 checkpoints (elastic resume on another GPU count)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    return {UNIVERSAL_CHECKPOINT_INFO: {}}


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict, device: torch.device | None = None):
    """`device`: the CUDA device this rank already chose (beit_scale/dist/device.py).  DeepSpeed
    would otherwise set the device from LOCAL_RANK, which is wrong under per-task GPU binding."""
    import types

    import deepspeed
    args = types.SimpleNamespace(device_rank=device.index) if device is not None and device.type == "cuda" else None
    engine, optimizer, _, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if device is not None and device.type == "cuda" and engine.device != device:
        raise RuntimeError(f"DeepSpeed placed the model on {engine.device} but this rank chose {device}")
    return engine


def engine_loss_scale(engine) -> float | None:
    """Current dynamic loss scale (fp16), None otherwise."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        val = getattr(opt, attr, None)
        if val is not None and not callable(val):
            return float(val)
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None:
        return float(scaler.cur_scale)
    return None


def full_state_dict(engine, rank0_only: bool = True) -> dict | None:
    """The module's complete fp32 state dict (gathered from the ranks under ZeRO-3).  Call on
    every rank (the gather is a collective); with rank0_only the others get None."""
    import torch.distributed as dist
    module = engine.module
    mine = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0

    def copy_out():
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()} if mine else None
    if engine.zero_optimization_stage() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return copy_out()
    return copy_out()


def is_min_loss_scale_error(exc: BaseException) -> bool:
    """DeepSpeed's fp16 loss scaler raises (raise_error_at_min_scale=True) when gradients overflow
    again with the scale already at min_loss_scale: the run has diverged."""
    msg = str(exc).lower()
    return "loss scale" in msg and "minimum" in msg


def scheduler_lag(engine, step: int) -> int | None:
    """How many steps DeepSpeed's lr scheduler is behind train.step (fp16 skipped steps do not
    step it); None without a scheduler."""
    sched = getattr(engine, "lr_scheduler", None)
    last = getattr(sched, "last_epoch", None)
    return None if last is None else int(step - last)


def engine_grad_norm(engine) -> float | None:
    gn = engine.get_global_grad_norm()
    if gn is None:
        return None
    return float(gn.item() if torch.is_tensor(gn) else gn)
