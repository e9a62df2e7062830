"""Which device this rank trains on, decided once, before any process group or tensor exists.

Why this is a step of its own: `deepspeed.init_distributed` does not set the CUDA device, and
DeepSpeed sets it only inside `deepspeed.initialize` from LOCAL_RANK.  Anything placed on "the
current device" before that (the frozen tokenizer, the first batch, a CUDA context) lands on
`cuda:0` on every rank of a node; and under Slurm per-task GPU binding (`--gpus-per-task=1`,
`--gpu-bind`, per-task cgroups) LOCAL_RANK can be 7 while the task sees one GPU, so DeepSpeed's
`set_device(LOCAL_RANK)` would fail.  `bind_device` picks the index from what the process can
see, sets it, and the engine is told the same index explicitly (`device_rank`).

It also refuses to train on CPU where GPUs are expected (a Slurm GPU allocation,
CUDA_VISIBLE_DEVICES, /dev/nvidia*) but CUDA is unusable: DeepSpeed would otherwise fall back to
its CPU accelerator and gloo without a word, and 64 ranks would "train" on CPU.  Running on CPU on
purpose on such a machine is one setting: DS_ACCELERATOR=cpu (DeepSpeed's own switch).

torch is imported inside the functions: importing this module costs nothing.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Mapping

from beit_scale.dist.env import DistConfigError, DistEnv, cuda_device_index, device_list

# Device files the NVIDIA driver creates for each GPU; their presence means "this is a GPU machine".
NVIDIA_DEVICE_GLOB = "/dev/nvidia[0-9]*"


@dataclass(frozen=True)
class DevicePlan:
    type: str                 # "cuda" | "cpu"
    index: int | None         # CUDA device index among the visible ones
    name: str = ""            # e.g. "NVIDIA H100 80GB HBM3"
    capability: tuple[int, int] | None = None
    why: str = ""             # one line for the run log: how the index was chosen

    @property
    def torch_device(self):
        import torch
        return torch.device(self.type, self.index) if self.type == "cuda" else torch.device("cpu")


def gpus_expected(environ: Mapping[str, str] | None = None, device_glob: str = NVIDIA_DEVICE_GLOB) -> str | None:
    """Why this process should have GPUs, or None when nothing says so."""
    environ = os.environ if environ is None else environ
    if environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return None  # the user asked DeepSpeed for the CPU accelerator on purpose
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_PER_TASK"):
        v = environ.get(name, "")
        if v and v not in ("0", "NoDevFiles"):
            return f"Slurm allocated GPUs ({name}={v})"
    if device_list(environ.get("CUDA_VISIBLE_DEVICES", "")):
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}"
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return None  # explicitly emptied: the user hid the GPUs
    found = sorted(glob.glob(device_glob))
    if found:
        return f"NVIDIA device files exist ({', '.join(found[:3])}{' ...' if len(found) > 3 else ''})"
    return None


def cuda_unusable_reason() -> str:
    """Why torch cannot use CUDA here, in words a user can act on."""
    import torch
    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build "
                "(pip install -r requirements.txt, or requirements-v100.txt on V100)")
    try:
        torch.cuda.init()  # raises with the driver's own explanation (e.g. "driver too old")
    except Exception as e:  # noqa: BLE001 - any CUDA init error is the reason we want to show
        msg = " ".join(str(e).split())
        if "too old" in msg.lower():
            msg += (f" (this PyTorch is built for CUDA {torch.version.cuda}; update the NVIDIA driver, "
                    "or install a PyTorch built for an older CUDA)")
        return msg
    if torch.cuda.device_count() == 0:
        return "the CUDA driver reports no device (check CUDA_VISIBLE_DEVICES and the job's GPU allocation)"
    return "torch.cuda.is_available() is False"


def wheel_archs() -> list[str]:
    """The GPU architectures this PyTorch wheel has kernels for, e.g. ['sm_80', 'sm_90', 'compute_90']."""
    import torch
    flags = ""
    try:
        flags = torch._C._cuda_getArchFlags()  # readable without a GPU
    except Exception:  # noqa: BLE001 - private API; fall back to the public one
        pass
    return flags.split() if flags else list(torch.cuda.get_arch_list())


def arch_supported(capability: tuple[int, int], archs: list[str]) -> bool:
    """True if a GPU of `capability` can run this wheel: a cubin for the same major architecture
    and an equal or lower minor (sm_80 runs on sm_86), or PTX (compute_XY) at or below it."""
    major, minor = capability
    for a in archs:
        kind, _, num = a.partition("_")
        num = num.rstrip("af")  # sm_90a / sm_100f: arch-specific variants of the same number
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def plan_device(env: DistEnv, environ: Mapping[str, str] | None = None,
                device_glob: str = NVIDIA_DEVICE_GLOB) -> DevicePlan:
    """Choose this rank's device; raise DistConfigError when GPUs are expected but unusable."""
    import torch
    environ = os.environ if environ is None else environ
    forced_cpu = environ.get("DS_ACCELERATOR", "").lower() == "cpu"
    if forced_cpu or not torch.cuda.is_available():
        if not forced_cpu:
            expected = gpus_expected(environ, device_glob)
            if expected:
                raise DistConfigError(
                    f"GPUs are expected here ({expected}) but CUDA is unusable: {cuda_unusable_reason()}. "
                    "Refusing to fall back to training on CPU. To run on CPU on purpose, set DS_ACCELERATOR=cpu")
        return DevicePlan("cpu", None, why="no GPU expected: CPU (gloo)" if not forced_cpu
                          else "DS_ACCELERATOR=cpu: CPU on purpose")
    n = torch.cuda.device_count()
    index = cuda_device_index(env, n)
    if n == 1 and env.local_world_size > 1:
        why = f"local rank {env.local_rank} sees 1 GPU (per-task binding): cuda:0"
    else:
        why = f"local rank {env.local_rank} of {env.local_world_size}, {n} GPU(s) visible: cuda:{index}"
    cap = tuple(torch.cuda.get_device_capability(index))
    name = torch.cuda.get_device_name(index)
    archs = wheel_archs()
    if archs and not arch_supported(cap, archs):
        sm = f"sm_{cap[0]}{cap[1]}"
        hint = (" V100 (sm_70) needs a CUDA 12 build of PyTorch: pip install -r requirements-v100.txt"
                if cap[0] == 7 else " Install a PyTorch build that lists it.")
        raise DistConfigError(
            f"{name} is compute capability {cap[0]}.{cap[1]} ({sm}) but this PyTorch {torch.__version__} "
            f"(CUDA {torch.version.cuda}) has kernels only for {' '.join(archs)}.{hint}")
    return DevicePlan("cuda", index, name=name, capability=cap, why=why)


_bound: DevicePlan | None = None


def current_plan() -> DevicePlan | None:
    """The plan `bind_device` applied in this process (None before)."""
    return _bound


def bind_device(plan: DevicePlan) -> None:
    """Make the plan this process's current device, before any CUDA tensor or process group."""
    global _bound
    _bound = plan
    if plan.type != "cuda":
        return
    import torch
    torch.cuda.set_device(plan.index)
    # Fixed input shapes: let cuDNN pick its fastest convolution (dVAE, patch embedding), and use
    # TF32 tensor cores for fp32 matmuls (Ampere+; a no-op before).  Half-precision runs do not
    # depend on either for their numerics.
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def check_precision(precision: str, plan: DevicePlan) -> None:
    """bf16 needs native support (compute capability 8.0+); is_bf16_supported() counts emulation."""
    if plan.type != "cuda":
        return
    cap = plan.capability or (0, 0)
    if precision == "bf16" and cap < (8, 0):
        raise DistConfigError(
            f"precision bf16 on {plan.name} (compute capability {cap[0]}.{cap[1]}): bf16 needs 8.0+ "
            "(A100/H100). Use the fp16 DeepSpeed files (ds_configs/zero*.json) or --set precision=fp16")
    if precision == "fp16" and cap < (6, 0):
        raise DistConfigError(f"precision fp16 on {plan.name} (compute capability {cap[0]}.{cap[1]}): "
                              "no fast fp16 below 6.0; use --set precision=fp32")
