"""The GPU path, checked on CPU with the CUDA calls mocked: device choice before anything is
placed, per-task Slurm GPU binding, no silent CPU fallback, wheel architecture and bf16 checks,
the embedded default batch on 1-8 GPUs, DeepSpeed told the device explicitly."""
import argparse
import subprocess
import sys
import types

import pytest
import torch

from beit_scale.dist import device as devmod
from beit_scale.dist.env import DistConfigError, DistEnv
from beit_scale.train import run
from launching import REPO

ARCHS_2_15 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"  # the PyPI torch 2.15.0 wheel (CUDA 13)


def _env(local_rank=0, local_world=2, rank=None, world=None, launcher="torchrun"):
    return DistEnv(rank=local_rank if rank is None else rank, local_rank=local_rank,
                   world_size=local_world if world is None else world, local_world_size=local_world,
                   node_rank=0, num_nodes=1, master_addr="127.0.0.1", master_port=29500, launcher=launcher)


class FakeCuda:
    """What a GPU node looks like to torch.cuda; records set_device calls in order."""

    def __init__(self, monkeypatch, count=2, capability=(9, 0), name="NVIDIA H100 80GB HBM3", archs=ARCHS_2_15,
                 available=True, events=None):
        self.events = [] if events is None else events
        self.current = 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch._C, "_cuda_getArchFlags", lambda: archs)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
        monkeypatch.setattr(devmod, "_bound", None)

    def set_device(self, i):
        self.current = i
        self.events.append(("set_device", i))


@pytest.fixture(autouse=True)
def _keep_matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------ finding 1: set_device first

def test_local_rank_1_sets_device_1_before_anything_is_placed(monkeypatch, tmp_path):
    """LOCAL_RANK=1 under torchrun on a 2-GPU node: set_device(1) happens in run.main before the
    stage starts (config, tokenizer, data, process group all come after), and the trainer's
    device is cuda:1, not the accelerator's default cuda:0."""
    events = []
    fake = FakeCuda(monkeypatch, count=2, events=events)
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT="29555").items():
        monkeypatch.setenv(k, v)

    # Anything that would place a tensor on "the current device" records what that device is.
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: (events.append(("tensor", fake.current)),
                                                         real_tensor(*a, **k))[1])

    def fake_main(stage, args, env):
        events.append(("stage starts", fake.current))
        from beit_scale.train.trainer import Trainer
        t = Trainer.__new__(Trainer)
        Trainer.__init__(t, cfg=types.SimpleNamespace(), task=types.SimpleNamespace(configure=lambda **kw: None),
                         ds_config={},
                         run_dir=tmp_path, ckpt=None)
        events.append(("trainer device", str(t.device)))
        return 0

    monkeypatch.setattr(run, "_main", fake_main)
    assert run.main("mim", []) == 0
    assert events[0] == ("set_device", 1), events
    assert ("stage starts", 1) in events and ("trainer device", "cuda:1") in events
    assert not any(e[0] == "tensor" and e[1] != 1 for e in events), events


def test_build_engine_passes_the_chosen_device_to_deepspeed(monkeypatch):
    """DeepSpeed would call set_device(LOCAL_RANK); we hand it the chosen index (device_rank)."""
    import deepspeed
    from beit_scale.train import engine as engine_mod
    seen = {}

    def fake_initialize(args=None, model=None, optimizer=None, lr_scheduler=None, config=None):
        seen["args"] = args
        return types.SimpleNamespace(device=torch.device("cuda", args.device_rank)), optimizer, None, lr_scheduler

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    engine = engine_mod.build_engine(torch.nn.Linear(2, 2), None, None, {}, torch.device("cuda", 0))
    assert seen["args"].device_rank == 0 and engine.device == torch.device("cuda", 0)
    # on CPU nothing is passed: DeepSpeed's CPU accelerator keeps its defaults
    monkeypatch.setattr(deepspeed, "initialize",
                        lambda args=None, **kw: (seen.update(cpu_args=args) or types.SimpleNamespace(
                            device=torch.device("cpu")), None, None, None))
    engine_mod.build_engine(torch.nn.Linear(2, 2), None, None, {}, torch.device("cpu"))
    assert seen["cpu_args"] is None


# ------------------------------------------------------------------ finding 2: Slurm GPU binding

@pytest.mark.parametrize("visible,local_rank,expected", [
    (8, 7, 7),   # every task sees the node's 8 GPUs: the local rank picks one
    (1, 7, 0),   # --gpus-per-task=1 / --gpu-bind / per-task cgroups: the one visible GPU
    (8, 0, 0),
    (1, 0, 0),
])
def test_device_index_for_both_binding_styles(monkeypatch, visible, local_rank, expected):
    FakeCuda(monkeypatch, count=visible)
    plan = devmod.plan_device(_env(local_rank=local_rank, local_world=8), {})
    assert plan.type == "cuda" and plan.index == expected
    devmod.bind_device(plan)
    assert torch.cuda.current_device() == expected


def test_more_ranks_than_visible_gpus_is_an_error(monkeypatch):
    FakeCuda(monkeypatch, count=2)
    with pytest.raises(DistConfigError, match="local rank 3 but only 2 visible GPU"):
        devmod.plan_device(_env(local_rank=3, local_world=8), {})


# ------------------------------------------------------------------ finding 4: no silent CPU

@pytest.mark.parametrize("environ,why", [
    ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
    ({"SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_JOB_GPUS"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
])
def test_expected_gpus_but_cuda_unusable_is_an_error(monkeypatch, environ, why):
    FakeCuda(monkeypatch, available=False)

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12020).")
    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(DistConfigError) as e:
        devmod.plan_device(_env(), environ, device_glob="/nonexistent/nvidia*")
    msg = str(e.value)
    assert why in msg and "too old" in msg and "update the NVIDIA driver" in msg and "DS_ACCELERATOR=cpu" in msg


def test_device_files_mean_gpus_are_expected(monkeypatch, tmp_path):
    FakeCuda(monkeypatch, available=False)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    (tmp_path / "nvidia0").touch()
    with pytest.raises(DistConfigError, match="NVIDIA device files exist"):
        devmod.plan_device(_env(), {}, device_glob=str(tmp_path / "nvidia[0-9]*"))


@pytest.mark.parametrize("environ", [{}, {"CUDA_VISIBLE_DEVICES": ""}, {"DS_ACCELERATOR": "cpu", "SLURM_GPUS_ON_NODE": "8"},
                                     {"SLURM_JOB_GPUS": "NoDevFiles"}])
def test_cpu_where_no_gpu_is_expected_or_asked_for(monkeypatch, environ):
    FakeCuda(monkeypatch, available=False)
    assert devmod.plan_device(_env(), environ, device_glob="/nonexistent/nvidia*").type == "cpu"


def test_cpu_only_torch_build_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in devmod.cuda_unusable_reason()


def test_launcher_refuses_cpu_fallback_when_gpus_are_expected(tmp_path):
    """The real launcher on this GPU-less machine, told it has GPUs: exit 2 with the reason,
    before any process group or training."""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="0", PYTHONPATH=str(REPO))
    env.pop("DS_ACCELERATOR", None)
    r = subprocess.run([sys.executable, "launch/pretrain.py", "--run_dir", str(tmp_path / "run")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "GPUs are expected here (CUDA_VISIBLE_DEVICES=0) but CUDA is unusable" in r.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ finding 3: wheel architectures

def test_v100_with_a_cuda13_wheel_is_a_clear_error(monkeypatch):
    FakeCuda(monkeypatch, count=8, capability=(7, 0), name="Tesla V100-SXM2-32GB")
    with pytest.raises(DistConfigError) as e:
        devmod.plan_device(_env(), {})
    msg = str(e.value)
    assert "compute capability 7.0 (sm_70)" in msg and "sm_75 sm_80" in msg and "requirements-v100.txt" in msg


@pytest.mark.parametrize("cap,archs,ok", [
    ((7, 0), ["sm_75", "sm_80"], False),
    ((7, 0), ["sm_70", "sm_80"], True),
    ((8, 6), ["sm_80", "sm_90"], True),          # same major, lower minor: the sm_80 cubin runs
    ((8, 9), ["sm_80", "sm_86"], True),
    ((9, 0), ["sm_80", "sm_90a"], True),
    ((10, 0), ["sm_80", "sm_90", "compute_90"], True),  # PTX JIT
    ((10, 0), ["sm_80", "sm_90"], False),
])
def test_arch_supported(cap, archs, ok):
    assert devmod.arch_supported(cap, archs) is ok


# ------------------------------------------------------------------ finding 4: bf16 needs 8.0+

def test_bf16_on_v100_is_an_error_fp16_is_fine():
    v100 = devmod.DevicePlan("cuda", 0, name="Tesla V100-SXM2-32GB", capability=(7, 0))
    with pytest.raises(DistConfigError, match="bf16 needs 8.0"):
        devmod.check_precision("bf16", v100)
    devmod.check_precision("fp16", v100)
    devmod.check_precision("bf16", devmod.DevicePlan("cuda", 0, name="A100", capability=(8, 0)))


def test_prepare_refuses_bf16_on_a_v100(monkeypatch):
    FakeCuda(monkeypatch, count=1, capability=(7, 0), name="Tesla V100-SXM2-32GB", archs="sm_70 sm_80")
    devmod.bind_device(devmod.plan_device(_env(local_world=1), {}))
    args = argparse.Namespace(config=None, set=["precision=bf16"], deepspeed_config=str(REPO / "ds_configs/zero2.json"),
                              run_dir=None)
    with pytest.raises(DistConfigError, match="bf16 needs 8.0"):
        run.prepare("mim", args, _env(local_world=1))


def test_bind_device_sets_tf32_and_cudnn_benchmark(monkeypatch):
    FakeCuda(monkeypatch, count=1)
    torch.backends.cudnn.benchmark = False
    devmod.bind_device(devmod.plan_device(_env(local_world=1), {}))
    assert torch.backends.cudnn.benchmark is True and torch.get_float32_matmul_precision() == "high"


# ------------------------------------------------------------------ finding 5: embedded batch

@pytest.mark.parametrize("world,micro,global_", [(1, 16, 32), (2, 16, 32), (4, 8, 32), (8, 4, 32),
                                                 (3, 11, 33), (6, 6, 36), (16, 2, 32), (64, 1, 64)])
@pytest.mark.parametrize("stage", ["tokenizer", "mim", "classify"])
def test_embedded_default_runs_on_any_gpu_count(world, micro, global_, stage):
    args = argparse.Namespace(config=None, set=[], deepspeed_config=str(REPO / "ds_configs/zero2.json"), run_dir=None)
    cfg, ds, _ = run.prepare(stage, args, _env(local_world=world))
    assert (cfg.train.micro_batch, cfg.train.global_batch) == (micro, global_)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * world * ds["gradient_accumulation_steps"]


def test_a_batch_the_user_chose_is_never_changed():
    from beit_scale.config import ConfigError
    args = argparse.Namespace(config=None, set=["train.micro_batch=16"],
                              deepspeed_config=str(REPO / "ds_configs/zero2.json"), run_dir=None)
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch x world size"):
        run.prepare("mim", args, _env(local_world=4))


# ------------------------------------------------------------------ finding 12: process-group timeout

def test_process_group_timeout_reaches_deepspeed(monkeypatch):
    import datetime

    import deepspeed
    import torch.distributed as dist
    from beit_scale.train import engine as engine_mod
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    engine_mod.init_distributed(90)
    assert seen["timeout"] == datetime.timedelta(minutes=90)
    from beit_scale.config import ConfigError, build_config
    assert build_config("mim")[0].train.dist_timeout_min == 60
    with pytest.raises(ConfigError, match="train.dist_timeout_min"):
        build_config("mim", overrides=["train.dist_timeout_min=0"])


def test_agree_stop_and_clock_without_a_process_group():
    from beit_scale.train.signals import SignalFlag, agree_stop_and_clock
    flag = SignalFlag()
    assert agree_stop_and_clock(flag, False, torch.device("cpu")) == (False, False)
    assert agree_stop_and_clock(flag, True, torch.device("cpu")) == (False, True)
    flag.name = "SIGUSR1"
    assert agree_stop_and_clock(flag, False, torch.device("cpu")) == (True, False)


def test_min_loss_scale_error_is_recognised():
    from beit_scale.train.engine import is_min_loss_scale_error
    assert is_min_loss_scale_error(Exception("Current loss scale already at minimum - cannot decrease scale "
                                             "anymore. Exiting run."))
    assert not is_min_loss_scale_error(RuntimeError("CUDA out of memory"))
