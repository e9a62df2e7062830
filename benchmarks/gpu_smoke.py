#!/usr/bin/env python3
"""GPU smoke test: does this machine run every part of beit_scale, and what does it measure?

One process runs the checks below in turn, each through the launchers' own code path
(``beit_scale.train.run``: prepare -> make_task -> train_stage, as tests/drivers/multi_run.py does,
so DeepSpeed, torch and CUDA start once), prints one table row per check, and writes the table as
JSON. A failing check is recorded (with the tail of its output) and the next one runs.

  env        device, compute capability and whether this torch wheel has kernels for it (sm_XY in
             torch._C._cuda_getArchFlags()), torch / CUDA / cuDNN / driver versions, native bf16
             (torch.cuda.is_bf16_supported(including_emulation=False)) and fp16, a tiny matmul in each
  sdpa       scaled_dot_product_attention with BEiT's relative-position bias as an additive float
             attn_mask (beit_scale/models/beit.py, Attention.forward) in fp16 and bf16: the kernel
             chosen by default, which backends accept the mask, and output + gradients (q, k, v, bias)
             of each accepting backend against the math kernel in fp32 (max abs / rel errors)
  mim_fp16   beit_base MIM (configs/pretrain/base.yaml on the embedded data), ZeRO-2, fp16 (dynamic
             loss scaling), --steps steps, micro batch 128: finite losses, loss
  mim_bf16   falling, skipped steps, loss scale, img/s, TFLOP/s, MFU (beit_scale/scaling/peaks.py),
             torch.cuda.max_memory_allocated vs the memory model (beit_scale/scaling/study.predict)
  resume     ZeRO-2 fp16: steps/3 steps with a checkpoint, then the same run with a higher
             train.max_steps must print "resumed from ... at step N" and log from step N+1 on
  tokenizer  the dVAE tokenizer stage in fp16 for a few steps; its tokenizer file is written and read back
  finetune   fine-tuning (configs/finetune/base.yaml: layer decay, mixup/cutmix, RandAugment) from the
             MIM run dir of an earlier check (init.from), weight EMA on (finetune.ema=true), steps/3 steps;
             the EMA is evaluated and saved in the checkpoint
  zero3      ZeRO-3 fp16 with activation checkpointing (train.act_ckpt=all), steps/3 steps, memory vs the
             model. Runs last: ZeRO-3 converts parameters in place, so it is kept after the others.

MIM targets come from a random dVAE tokenizer (vocabulary 8192, as the scaling study makes one):
MIM needs targets, not good ones. Throughput on the embedded dataset can be bound by JPEG decoding
on the host's cores; the table says how many data workers ran.

    bash benchmarks/gpu_smoke.sh                        # all checks, ~3-5 min on one H100/H200 (estimate)
    bash benchmarks/gpu_smoke.sh --only env,sdpa        # just those
    bash benchmarks/gpu_smoke.sh --steps 60 --keep      # longer MIM runs, keep the run dirs
    bash benchmarks/gpu_smoke.sh --isolate              # each check in its own process (slower; for
                                                        # when one check leaves CUDA in a bad state)

Exit status: 0 when every check ran ok (or was skipped), 1 when any failed, 2 for bad arguments.
Without a GPU: one message, a JSON that says "skipped", exit 0, and no training started (unless
GPUs were expected here, e.g. /dev/nvidia* exist, and CUDA is unusable: that is a failure).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_CHECKS = ("env", "sdpa", "mim_fp16", "mim_bf16", "resume", "tokenizer", "finetune", "zero3")
SELFTEST_CHECKS = ("env", "sdpa", "mim_fp32", "resume", "tokenizer", "finetune", "zero3")
ALIASES = {"mim": ("mim_fp16", "mim_bf16", "mim_fp32")}
DEFAULT_OUT = "runs/gpu_smoke/smoke.json"
# The MIM runs use the paper recipe's YAML (drop path 0.1, layer scale 0.1, shared relative position
# bias, grad clip 3.0 checked against the DeepSpeed file) on the embedded data, short and small-batch.
MIM_CONFIG = "configs/pretrain/base.yaml"
FINETUNE_CONFIG = "configs/finetune/base.yaml"
GiB = 2 ** 30

# SDPA: max |err| / max |reference| allowed against fp32 math. A kernel that ignored the mask would be
# off by the mask's effect (reported as mask_effect_rel, O(1) here), far above these.
SDPA_TOL = {"fp16": {"out": 1e-2, "grad": 2e-2}, "bf16": {"out": 5e-2, "grad": 1e-1}}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
SDPA_OPS = (("_scaled_dot_product_flash_attention", "flash"), ("_scaled_dot_product_efficient_attention", "efficient"),
            ("_scaled_dot_product_cudnn_attention", "cudnn"), ("_scaled_dot_product_attention_math", "math"),
            ("_scaled_dot_product_fused_attention_overrideable", "overrideable"))


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="GPU smoke test of beit_scale: environment, SDPA with a float bias, MIM fp16/bf16 "
                    "under ZeRO-2, resume, tokenizer fp16, fine-tuning with EMA, ZeRO-3 with activation "
                    "checkpointing. Prints a table and writes it as JSON. Without a GPU it says so and "
                    "exits 0 without training.",
        epilog=f"checks: {', '.join(GPU_CHECKS)} (alias: mim = mim_fp16,mim_bf16)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file for the table (default {DEFAULT_OUT})")
    ap.add_argument("--only", default=None, metavar="CHECK[,CHECK]",
                    help="run only these checks, comma-separated")
    ap.add_argument("--steps", type=int, default=None,
                    help="MIM steps per precision (default 30); resume/finetune/zero3 use steps/3, "
                         "the tokenizer steps/6 (at least 2 each)")
    ap.add_argument("--keep", action="store_true", help="keep the run dirs (default: deleted at the end)")
    ap.add_argument("--model", default=None, help="model for the training checks (default beit_base_patch16_224)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="micro batch of the MIM checks (default 128; the shorter checks use half)")
    ap.add_argument("--workers", type=int, default=None,
                    help="data.num_workers of every run (default: min(8, CPU cores - 2))")
    ap.add_argument("--runs-dir", default=None, help="where run dirs go (default: <out dir>/<out stem>_runs)")
    ap.add_argument("--isolate", action="store_true",
                    help="run each check in its own process (more start-up time; a crash stays in its row)")
    ap.add_argument("--cpu-selftest", action="store_true", help=argparse.SUPPRESS)  # the test's CPU mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)         # set by --isolate
    a = ap.parse_args(argv)
    names = SELFTEST_CHECKS if a.cpu_selftest else GPU_CHECKS
    if a.only is None:
        a.checks = list(names)
    else:
        want, bad = [], []
        for tok in (t.strip() for t in a.only.split(",")):
            if not tok:
                continue
            expanded = [n for n in ALIASES[tok] if n in names] if tok in ALIASES else [tok]
            for n in expanded:
                (want if n in names else bad).append(n)
        if bad or not want:
            ap.error(f"--only: unknown check(s) {', '.join(bad) or repr(a.only)}; "
                     f"known: {', '.join(names)} (alias: mim)")
        a.checks = [n for n in names if n in want]   # the run order is fixed
    for k in ("steps", "micro_batch", "workers"):
        v = getattr(a, k)
        if v is not None and v < (0 if k == "workers" else 1):
            ap.error(f"--{k.replace('_', '-')} must be >= {0 if k == 'workers' else 1}, got {v}")
    return a


class Settings:
    """Sizes of every run, from the mode and the options."""

    def __init__(self, a: argparse.Namespace, selftest: bool):
        self.selftest = selftest
        self.model = a.model or ("beit_debug" if selftest else "beit_base_patch16_224")
        self.steps = a.steps or (6 if selftest else 30)
        self.short = max(2, self.steps // 3)
        self.extend = max(1, self.short // 2)
        self.tok_steps = max(2, self.steps // 6)
        self.mb = a.micro_batch or (4 if selftest else 128)
        self.mb_short = max(2, self.mb // 2) if not selftest else self.mb
        self.mb_short += self.mb_short % 2        # mixup/cutmix (finetune) need an even micro batch
        self.workers = a.workers if a.workers is not None else (
            0 if selftest else max(1, min(8, (os.cpu_count() or 4) - 2)))
        self.vocab, self.hidden = (64, 16) if selftest else (8192, 64)
        self.warmup = max(1, min(5, self.steps // 3))   # steps left out of img/s (start-up)
        self.lr_warmup = max(1, self.steps // 6)

    def to_dict(self) -> dict:
        return dict(vars(self))


# ----------------------------------------------------------------------------------------------
# output capture (every check keeps the tail of what it printed, for its error record)
# ----------------------------------------------------------------------------------------------
class Tee(io.TextIOBase):
    def __init__(self, stream, lines: collections.deque):
        self.stream, self.lines, self._part = stream, lines, ""

    def write(self, s):
        self.stream.write(s)
        self._part += s
        if "\n" in self._part:
            *done, self._part = self._part.split("\n")
            self.lines.extend(done)
        return len(s)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def fileno(self):
        return self.stream.fileno()


@contextlib.contextmanager
def captured(maxlines: int = 400):
    lines: collections.deque = collections.deque(maxlen=maxlines)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(out, lines), Tee(err, lines)
    try:
        yield lines
    finally:
        sys.stdout, sys.stderr = out, err


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _fmt(v, spec=".3g", empty="n/a") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return empty
    return format(v, spec)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def train_records(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r.get("kind", "train") == "train"]


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / "checkpoints" / "LATEST").exists()


def device_peak(precision: str) -> tuple[float | None, str]:
    """Dense peak FLOP/s of cuda:0 for `precision` from beit_scale.scaling.peaks; (None, why) if unknown."""
    import torch
    if not torch.cuda.is_available():
        return None, "CPU: no datasheet peak"
    try:
        from beit_scale.scaling import peaks
    except Exception as e:  # noqa: BLE001
        return None, f"peaks module unavailable: {e}"
    props = torch.cuda.get_device_properties(0)
    if hasattr(peaks, "gpu_peak"):
        try:
            return peaks.gpu_peak(props.name, precision, props.total_memory)
        except Exception as e:  # noqa: BLE001 - an unknown device is "MFU n/a", not a failed check
            return None, f"{type(e).__name__}: {e}"
    try:
        return peaks.peak_flops(props.name, precision, props.total_memory), "peaks.peak_flops"
    except Exception as e:  # noqa: BLE001
        return None, str(e)


# ----------------------------------------------------------------------------------------------
# the context shared by the checks
# ----------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, a, settings: Settings, runs_dir: Path, selftest: bool):
        self.a, self.s, self.runs_dir, self.selftest = a, settings, runs_dir, selftest
        self.env = None            # beit_scale.dist.env view, set once
        self.tokenizer = None      # random dVAE for MIM targets
        self.device_info: dict = {}

    @property
    def cuda(self) -> bool:
        import torch
        return (not self.selftest) and torch.cuda.is_available()

    def precision(self, want: str) -> str:
        return "fp32" if self.selftest else want

    def bf16_ok(self) -> bool:
        import torch
        if not self.cuda:
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:
            return torch.cuda.get_device_capability(0) >= (8, 0)

    def dist(self):
        """The launcher's process view and device binding, done once (as run.main does)."""
        if self.env is None:
            from beit_scale.train import run
            self.env = run._dist_env()
            if hasattr(run, "setup_device"):
                run.setup_device(self.env)
        return self.env

    def mim_tokenizer(self) -> Path:
        if self.tokenizer is None:
            from beit_scale.scaling.study import make_tokenizer
            self.tokenizer = make_tokenizer(self.runs_dir, self.s.vocab, self.s.hidden)
        return self.tokenizer

    def fresh_dir(self, name: str) -> Path:
        d = self.runs_dir / name
        if d.exists():
            shutil.rmtree(d)
        return d

    # -- one training run through the launcher path -------------------------------------------
    def train(self, stage: str, run_dir: Path, sets: list[str], ds_config: str = "zero2.json",
              config: str | None = None) -> dict:
        """prepare -> make_task -> train_stage in this process. Returns what the run left."""
        import torch
        if config is None and stage == "mim":
            config = MIM_CONFIG
        from beit_scale.train import run
        env = self.dist()
        common = ["train.log_every=1", "train.eval_batches=1", "train.image_log_every=0",
                  f"data.num_workers={self.s.workers}"]
        args = argparse.Namespace(deepspeed_config=str(REPO / "ds_configs" / ds_config),
                                  config=str(REPO / config) if config else None,
                                  run_dir=str(run_dir), set=common + list(sets))
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if self.cuda else 0
        cfg, ds, run_dir = run.prepare(stage, args, env)
        task = run.make_task(cfg, cfg.tokenizer.checkpoint if stage == "mim" else None)
        t0 = time.time()
        result = run.train_stage(cfg, ds, Path(run_dir), env, task)
        wall = time.time() - t0
        out = {"result": result or {}, "cfg": cfg, "ds": ds, "task": task, "wall_s": wall,
               "mem_before_bytes": before}
        return out

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            import torch
            torch.cuda.empty_cache()


def _check_result(res: dict) -> str | None:
    r = res.get("result") or {}
    for k in ("diverged", "stopped", "paused"):
        if r.get(k):
            return f"the run ended early: {k}={r[k]!r}"
    return None


# ----------------------------------------------------------------------------------------------
# check 1: environment
# ----------------------------------------------------------------------------------------------
def _verdict(problems: list[str], **row) -> dict:
    """A check's row: FAIL with the problems joined, or ok."""
    return {"status": "FAIL" if problems else "ok", **row, "error": "; ".join(problems)}


def _basic_problems(res: dict, train: list, expected_steps: int, fig: dict) -> list[str]:
    """What every training check fails on: the run's own error, missing steps, a non-finite loss."""
    problems = []
    early = _check_result(res)
    if early:
        problems.append(early)
    if len(train) != expected_steps:
        problems.append(f"{len(train)} of {expected_steps} steps logged")
    if not fig.get("all_finite"):
        problems.append("non-finite loss")
    return problems


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"nvidia_smi": "not found"}
    out = {}
    try:
        q = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,compute_cap",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        first = (q.stdout.strip().splitlines() or [""])[0]
        parts = [p.strip() for p in first.split(",")]
        if len(parts) >= 2:
            out.update(smi_name=parts[0], driver_version=parts[1],
                       smi_memory=parts[2] if len(parts) > 2 else None,
                       smi_compute_cap=parts[3] if len(parts) > 3 else None)
        else:
            out["nvidia_smi"] = (q.stderr or q.stdout).strip()[-300:]
        plain = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"CUDA Version:\s*([\d.]+)", plain)
        if m:
            out["driver_cuda_version"] = m.group(1)
    except (OSError, subprocess.SubprocessError) as e:
        out["nvidia_smi"] = f"failed: {e}"
    return out


def check_env(ctx: Ctx) -> dict:
    import torch
    fig: dict = {"python": platform.python_version(), "torch": torch.__version__,
                 "torch_cuda_build": torch.version.cuda, "host_cpus": os.cpu_count()}
    try:
        import deepspeed
        fig["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001
        fig["deepspeed"] = f"import failed: {e}"
    try:
        flags = torch._C._cuda_getArchFlags() or ""
    except Exception:  # noqa: BLE001 - private API
        flags = " ".join(torch.cuda.get_arch_list())
    fig["arch_flags"] = flags
    notes, problems = [], []
    if not ctx.cuda:
        fig["device"] = "cpu"
        fig["cuda_available"] = torch.cuda.is_available()
        summary = f"CPU self-test; torch {torch.__version__} (CUDA build {torch.version.cuda}), wheel archs: {flags or 'n/a'}"
        return {"status": "ok", "figures": fig, "summary": summary, "notes": notes}
    props = torch.cuda.get_device_properties(0)
    cap = (props.major, props.minor)
    sm = f"sm_{cap[0]}{cap[1]}"
    fig.update(device=props.name, device_count=torch.cuda.device_count(), capability=f"{cap[0]}.{cap[1]}",
               sm=sm, sm_in_arch_flags=sm in flags.split(), memory_gib=round(props.total_memory / GiB, 1),
               multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    try:
        from beit_scale.dist.device import arch_supported
        fig["arch_supported"] = bool(arch_supported(cap, flags.split()))
    except ImportError:
        fig["arch_supported"] = fig["sm_in_arch_flags"]
    if not fig["sm_in_arch_flags"]:
        (notes if fig["arch_supported"] else problems).append(
            f"{sm} is not in this wheel's arch list ({flags})"
            + ("; a compatible cubin/PTX covers it" if fig["arch_supported"] else ""))
    fig.update(_nvidia_smi())
    try:
        fig["bf16_native"] = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        fig["bf16_native"] = cap >= (8, 0)
    fig["bf16_incl_emulation"] = bool(torch.cuda.is_bf16_supported())
    fig["fp16"] = cap >= (6, 0)
    try:
        from beit_scale.train.engine import device_supports
        fig["deepspeed_fp16"] = device_supports("fp16")
        fig["deepspeed_bf16"] = device_supports("bf16")
    except Exception as e:  # noqa: BLE001
        notes.append(f"DeepSpeed accelerator query failed: {e}")
    for dt in ("fp16", "bf16", "fp32"):
        if dt == "bf16" and not fig["bf16_native"]:
            fig["matmul_bf16"] = "skip (no native bf16)"
            continue
        try:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
            a = torch.randn(512, 512, device="cuda", dtype=dtype)
            v = float((a @ a).float().abs().mean())
            torch.cuda.synchronize()
            fig[f"matmul_{dt}"] = "ok" if math.isfinite(v) else f"non-finite ({v})"
            if not math.isfinite(v):
                problems.append(f"{dt} matmul gave {v}")
        except Exception as e:  # noqa: BLE001
            fig[f"matmul_{dt}"] = f"failed: {e}"
            problems.append(f"{dt} matmul failed: {str(e).splitlines()[0]}")
    ctx.device_info = {k: fig.get(k) for k in ("device", "capability", "memory_gib", "torch", "torch_cuda_build",
                                               "driver_version", "deepspeed")}
    summary = (f"{props.name} cc {cap[0]}.{cap[1]} ({sm} {'in' if fig['sm_in_arch_flags'] else 'NOT in'} wheel archs), "
               f"{fig['memory_gib']} GiB; torch {torch.__version__} CUDA {torch.version.cuda}, driver "
               f"{fig.get('driver_version', '?')} (CUDA {fig.get('driver_cuda_version', '?')}); "
               f"bf16 native {fig['bf16_native']}, fp16 {fig['fp16']}")
    return _verdict(problems, figures=fig, summary=summary, notes=notes)


# ----------------------------------------------------------------------------------------------
# check 2: SDPA with a float relative-position bias
# ----------------------------------------------------------------------------------------------
def _sdpa_op(fn) -> str:
    """Which SDPA implementation `fn` dispatches to, from the profiler's aten op names."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    for op, label in SDPA_OPS:
        if any(op in n for n in names):
            return label + ("_cpu" if any(op in n and n.endswith("_for_cpu") for n in names) else "")
    seen = sorted(n for n in names if "scaled_dot_product" in n or "attention" in n)
    return "unknown (" + ", ".join(seen[:4]) + ")"


def _rel(a, b) -> tuple[float, float]:
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    return err, err / max(scale, 1e-30)


def check_sdpa(ctx: Ctx) -> dict:
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = "cuda" if ctx.cuda else "cpu"
    # BEiT-Base attention: 12 heads of 64 over 197 tokens (14x14 patches + cls); smaller on CPU.
    B, H, N, D = (16, 12, 197, 64) if ctx.cuda else (2, 2, 197, 16)
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    bias0 = torch.randn(H, N, N, generator=g)          # [heads, N, N], broadcast over the batch
    dout0 = torch.randn(B, H, N, D, generator=g)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")       # the reference in true fp32 (no TF32)
    try:
        def leaf(t, dtype=torch.float32):
            return t.detach().to(dev, dtype).clone().requires_grad_(True)   # a fresh leaf every time

        q, k, v, bias = leaf(q0), leaf(k0), leaf(v0), leaf(bias0)
        with sdpa_kernel([SDPBackend.MATH]):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            ref.backward(dout0.to(dev))
            no_mask = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
        refs = {"out": ref.detach(), "q": q.grad, "k": k.grad, "v": v.grad, "bias": bias.grad}
        mask_effect = _rel(no_mask, ref.detach())[1]
    finally:
        torch.set_float32_matmul_precision(prev)

    def inputs(dtype):
        """Training-like inputs: q, k, v and the bias require grad; the bias is an fp32 parameter
        cast to the activation dtype, as Attention.forward does (mask.to(q.dtype))."""
        q, k, v = (leaf(t, dtype) for t in (q0, k0, v0))
        return q, k, v, leaf(bias0)

    def run_once(dtype):
        q, k, v, b = inputs(dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=b.to(dtype))
        out.backward(dout0.to(dev, dtype))
        if dev == "cuda":
            torch.cuda.synchronize()
        return {"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad, "bias": b.grad}

    fig: dict = {"shape": [B, H, N, D], "mask_effect_rel": mask_effect, "reference": "math kernel, fp32"}
    problems, parts = [], []
    dtypes = ["fp16", "bf16"]
    if ctx.cuda and not ctx.bf16_ok():
        dtypes = ["fp16"]
        fig["bf16"] = "skip (no native bf16)"
    for name in dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        tol = SDPA_TOL[name]
        d: dict = {}
        try:
            q, k, v, b = inputs(dtype)
            d["default_kernel"] = _sdpa_op(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=b.to(dtype)))
            del q, k, v, b
        except Exception as e:  # noqa: BLE001
            d["default_kernel"] = f"failed: {str(e).splitlines()[0]}"
            problems.append(f"{name}: the default SDPA path failed")
        backends = {}
        for bname in SDPA_BACKENDS:
            if not hasattr(SDPBackend, bname):
                continue
            entry: dict = {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([getattr(SDPBackend, bname)]):
                        got = run_once(dtype)
                    entry["accepts_float_mask"] = True
                    worst = 0.0
                    for key, refv in refs.items():
                        err, rel = _rel(got[key], refv)
                        finite = bool(torch.isfinite(got[key]).all())
                        entry[f"{key}_max_abs"], entry[f"{key}_max_rel"] = err, rel
                        lim = tol["out" if key == "out" else "grad"]
                        if not finite or rel > lim:
                            problems.append(f"{name} {bname.lower()}: {key} rel err {rel:.3g} > {lim:g}"
                                            + ("" if finite else " (non-finite values)"))
                        worst = max(worst, rel)
                    entry["worst_rel"] = worst
                except Exception as e:  # noqa: BLE001 - "No available kernel", or a kernel's own refusal
                    why = [re.sub(r"\s*\(Triggered internally at .*", "", str(w.message)).strip() for w in caught]
                    why = [w for w in why if w and not w.endswith("because:")]
                    entry["accepts_float_mask"] = False
                    entry["why"] = "; ".join(dict.fromkeys(why))[:400] or str(e).splitlines()[0][:400]
            backends[bname.lower().replace("_attention", "")] = entry
        d["backends"] = backends
        accepted = [b for b, e in backends.items() if e.get("accepts_float_mask")]
        if not accepted:
            problems.append(f"{name}: no SDPA backend accepted the float mask")
        d["accepting"] = accepted
        fig[name] = d
        worst = max((backends[b]["worst_rel"] for b in accepted), default=float("nan"))
        parts.append(f"{name}: default {d['default_kernel']}, mask ok in {'/'.join(accepted) or 'none'}, "
                     f"worst rel err {_fmt(worst, '.2g')}")
    summary = "; ".join(parts) + f" (mask effect {mask_effect:.2g})"
    return _verdict(problems, figures=fig, summary=summary)


# ----------------------------------------------------------------------------------------------
# training checks
# ----------------------------------------------------------------------------------------------
def _losses_summary(train: list[dict]) -> dict:
    losses = [r.get("loss") for r in train if "loss" in r]
    fig: dict = {"steps_logged": len(train), "losses": losses}
    if not losses:
        return fig
    fig["all_finite"] = all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses)
    k = max(1, min(3, len(losses) // 3))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    fig.update(loss_first=first, loss_last=last, loss_falling=bool(last < first), loss_window=k)
    fig["skipped_steps"] = int(train[-1].get("skipped_steps", 0) or 0)
    scales = [r["loss_scale"] for r in train if r.get("loss_scale") is not None]
    if scales:
        fig.update(loss_scale_first=scales[0], loss_scale_last=scales[-1], loss_scale_min=min(scales))
    return fig


def _perf_and_memory(ctx: Ctx, res: dict, run_dir: Path, zero: int, act_ckpt: bool, micro_batch: int,
                     stage: str = "mim") -> dict:
    """img/s, TFLOP/s and MFU over the measured steps, peak memory vs the memory model (MIM only)."""
    from beit_scale.scaling import study
    s = ctx.s
    fig: dict = {}
    summ = study.summarize_run(run_dir, s.warmup, 1)
    prec = summ.get("precision_effective") or res["cfg"].precision or "fp32"
    fig.update({k: summ.get(k) for k in ("measured_steps", "samples_per_sec", "step_time_s",
                                         "tflops_per_device", "precision_effective")})
    peak, why = device_peak(prec) if ctx.cuda else (None, "CPU: no datasheet peak")
    fig["peak_tflops"] = peak / 1e12 if peak else None
    fig["mfu"] = (summ["tflops_per_device"] * 1e12 / peak) if peak and summ.get("tflops_per_device") else None
    if peak is None:
        fig["mfu_note"] = f"MFU n/a: {why}"
    measured = summ.get("measured_mem_bytes")
    fig["peak_mem_kind"] = summ.get("peak_mem_kind")
    if measured is not None:
        fig["measured_mem_bytes"] = measured
        fig["mem_before_run_bytes"] = res["mem_before_bytes"]
        net = measured - res["mem_before_bytes"]
        fig["measured_net_bytes"] = net
        if stage == "mim":
            p = study.Point(ctx.s.model, zero, act_ckpt, micro_batch, prec, 1, 1)
            scfg = study.StudyConfig(tokenizer_vocab=s.vocab, tokenizer_hidden=s.hidden, ds_config_dir="ds_configs")
            pred = study.predict(p, prec, scfg, ctx.mim_tokenizer(), {"kind": "cuda" if ctx.cuda else "cpu"})
            fig.update({k: v for k, v in pred.items() if k.startswith("pred") or k == "num_params"})
            if pred.get("pred_compare_bytes"):
                fig["mem_ratio"] = net / pred["pred_compare_bytes"]
                fig["mem_within_15pct"] = abs(fig["mem_ratio"] - 1) <= study.TOLERANCE
    return fig


def _perf_text(fig: dict) -> str:
    t = f"{_fmt(fig.get('samples_per_sec'), '.1f')} img/s, {_fmt(fig.get('tflops_per_device'), '.3g')} TFLOP/s"
    t += f", MFU {_fmt(fig['mfu'] * 100, '.1f')}%" if fig.get("mfu") is not None else ", MFU n/a"
    if fig.get("mem_ratio") is not None:
        kind = "alloc" if fig.get("peak_mem_kind") == "cuda_max_allocated" else fig.get("peak_mem_kind")
        t += (f", mem {fig['measured_net_bytes'] / GiB:.2f} GiB {kind} vs model "
              f"{fig['pred_compare_bytes'] / GiB:.2f} ({fig['mem_ratio']:.2f}x)")
    return t


def _loss_text(fig: dict) -> str:
    t = f"loss {_fmt(fig.get('loss_first'), '.3f')}->{_fmt(fig.get('loss_last'), '.3f')}"
    t += f", skipped {fig.get('skipped_steps', 'n/a')}"
    if fig.get("loss_scale_last") is not None:
        t += f", scale {fig['loss_scale_last']:g}"
    return t


def _mim_sets(ctx: Ctx, steps: int, precision: str, micro_batch: int, extra=()) -> list[str]:
    s = ctx.s
    return [f"model.name={s.model}", "data.path=null",           # null: the embedded dataset
            f"tokenizer.checkpoint={ctx.mim_tokenizer()}",
            f"tokenizer.vocab_size={s.vocab}", f"train.max_steps={steps}",
            f"train.micro_batch={micro_batch}", f"train.global_batch={micro_batch}",
            f"optim.warmup_steps={max(1, min(s.lr_warmup, steps // 2))}", f"precision={precision}",
            *([f"train.cpu_mem_profile_steps={s.warmup}"] if not ctx.cuda else []), *extra]


def check_mim(ctx: Ctx, want: str) -> dict:
    prec = ctx.precision(want)
    if want == "bf16" and ctx.cuda and not ctx.bf16_ok():
        return {"status": "skip", "summary": "no native bf16 on this GPU (fp16 is the mixed precision here)"}
    run_dir = ctx.fresh_dir(f"mim_{prec}")
    s = ctx.s
    res = ctx.train("mim", run_dir, _mim_sets(ctx, s.steps, prec, s.mb))
    train = train_records(read_records(run_dir))
    fig = {"precision": prec, "zero": 2, "model": s.model, "micro_batch": s.mb, "steps": s.steps,
           "data_workers": s.workers, "wall_s": res["wall_s"], **_losses_summary(train)}
    fig.update(_perf_and_memory(ctx, res, run_dir, 2, False, s.mb))
    problems = _basic_problems(res, train, s.steps, fig)
    if not fig.get("loss_falling"):
        problems.append(f"loss not falling ({_fmt(fig.get('loss_first'))} -> {_fmt(fig.get('loss_last'))})")
    if fig.get("skipped_steps", 0) * 2 >= max(1, s.steps):
        problems.append(f"{fig['skipped_steps']} of {s.steps} steps skipped (overflow)")
    notes = [fig["mfu_note"]] if fig.get("mfu_note") else []
    if fig.get("mem_within_15pct") is False:
        notes.append(f"memory {fig['mem_ratio']:.2f}x the model's prediction (outside 15%)")
    return _verdict(problems, figures=fig, notes=notes,
                    summary=f"{_loss_text(fig)}; {_perf_text(fig)} (batch {s.mb}, {s.workers} data workers)")


def check_resume(ctx: Ctx) -> dict:
    s = ctx.s
    prec = ctx.precision("fp16")
    run_dir = ctx.fresh_dir("resume")
    first, total = s.short, s.short + s.extend
    base = lambda steps: _mim_sets(ctx, steps, prec, s.mb_short)  # noqa: E731
    ctx.train("mim", run_dir, base(first))
    if not has_checkpoint(run_dir):
        return {"status": "FAIL", "error": f"no complete checkpoint after the first {first} steps",
                "figures": {}}
    n_before = len(read_records(run_dir))
    before_train = train_records(read_records(run_dir))
    ctx.cleanup()
    with captured(maxlines=100000) as lines:          # what the second run printed
        res = ctx.train("mim", run_dir, base(total))
    text = "\n".join(lines)
    m = re.search(r"resumed from (\S+) at step (\d+)", text)
    recs = read_records(run_dir)
    new = train_records(recs[n_before:]) if len(recs) >= n_before else []
    train = train_records(recs)
    fig = {"precision": prec, "first_run_steps": first, "second_run_max_steps": total,
           "resumed_from": m.group(1) if m else None, "resumed_at_step": int(m.group(2)) if m else None,
           "first_new_step": new[0]["step"] if new else None, "last_step": train[-1]["step"] if train else None,
           }
    fig.update({k: v for k, v in _losses_summary(train).items() if k != "losses"})
    fig["logged_steps"] = [r["step"] for r in train]
    fig["losses"] = [r.get("loss") for r in train]
    ls_before = [r["loss_scale"] for r in before_train if r.get("loss_scale") is not None]
    ls_after = [r["loss_scale"] for r in new if r.get("loss_scale") is not None]
    if ls_before and ls_after:
        fig.update(loss_scale_at_save=ls_before[-1], loss_scale_after_resume=ls_after[0])
    problems = []
    early = _check_result(res)
    if early:
        problems.append(early)
    if not m:
        problems.append("the second run did not print 'resumed from ... at step N'")
    elif int(m.group(2)) != first:
        problems.append(f"resumed at step {m.group(2)}, expected {first}")
    if fig["first_new_step"] != first + 1:
        problems.append(f"the second run logged from step {fig['first_new_step']}, expected {first + 1}")
    if fig["logged_steps"] != list(range(1, total + 1)):
        problems.append(f"steps logged {fig['logged_steps']}, expected 1..{total}")
    if not fig.get("all_finite"):
        problems.append("non-finite loss")
    summary = (f"{first} steps + checkpoint, then max_steps={total}: resumed at step "
               f"{fig['resumed_at_step']}, logged from {fig['first_new_step']} to {fig['last_step']}; "
               f"{_loss_text(fig)}")
    if "loss_scale_at_save" in fig:
        summary += f" (scale at save {fig['loss_scale_at_save']:g}, after {fig['loss_scale_after_resume']:g})"
    return _verdict(problems, figures=fig, summary=summary)


def check_tokenizer(ctx: Ctx) -> dict:
    s = ctx.s
    prec = ctx.precision("fp16")
    run_dir = ctx.fresh_dir("tokenizer")
    mb = 4 if ctx.selftest else 64
    res = ctx.train("tokenizer", run_dir, [f"train.max_steps={s.tok_steps}", f"train.micro_batch={mb}",
                                           f"train.global_batch={mb}", "optim.warmup_steps=1", f"precision={prec}"])
    train = train_records(read_records(run_dir))
    fig = {"precision": prec, "steps": s.tok_steps, "micro_batch": mb, **_losses_summary(train)}
    last = train[-1] if train else {}
    fig.update({k: last.get(k) for k in ("recon", "kl", "perplexity", "codes_used", "samples_per_sec")})
    problems = _basic_problems(res, train, s.tok_steps, fig)
    # The launcher's last step for this stage: consolidate the checkpoint into the file MIM loads.
    from beit_scale.train import run
    from beit_scale.train.tasks.tokenizer import read_tokenizer_meta, tokenizer_path_in
    try:
        run._save_tokenizer_from_run(run_dir, ctx.dist())
        meta = read_tokenizer_meta(tokenizer_path_in(run_dir))
        fig["tokenizer_file"] = str(tokenizer_path_in(run_dir))
        fig["tokenizer_vocab"] = meta["vocab_size"]
        if meta["vocab_size"] != res["cfg"].tokenizer.vocab_size:
            problems.append(f"tokenizer file vocabulary {meta['vocab_size']} != {res['cfg'].tokenizer.vocab_size}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"writing/reading the tokenizer file failed: {type(e).__name__}: {e}")
    summary = (f"{_loss_text(fig)}; recon {_fmt(fig.get('recon'), '.4f')}, codes used "
               f"{_fmt(fig.get('codes_used'), '.0f')}, file vocab {fig.get('tokenizer_vocab', 'n/a')}")
    return _verdict(problems, figures=fig, summary=summary)


def _mim_source(ctx: Ctx) -> tuple[Path, str]:
    for name in ("mim_fp16", "mim_bf16", "mim_fp32", "resume"):
        d = ctx.runs_dir / name
        if has_checkpoint(d):
            return d, f"the {name} check's run"
    d = ctx.fresh_dir("finetune_src")
    ctx.train("mim", d, _mim_sets(ctx, 2, ctx.precision("fp16"), ctx.s.mb_short))
    ctx.cleanup()
    return d, "a 2-step MIM run made for it"


def check_finetune(ctx: Ctx) -> dict:
    s = ctx.s
    prec = ctx.precision("fp16")
    src, src_what = _mim_source(ctx)
    run_dir = ctx.fresh_dir("finetune")
    sets = [f"model.name={s.model}", "model.num_classes=10", f"init.from={src}", "finetune.ema=true",
            f"train.max_steps={s.short}", f"train.micro_batch={s.mb_short}", f"train.global_batch={s.mb_short}",
            "optim.warmup_steps=1", "train.eval_every=0", "checkpoint.every_steps=0", f"precision={prec}"]
    res = ctx.train("classify", run_dir, sets, config=FINETUNE_CONFIG)
    recs = read_records(run_dir)
    train = train_records(recs)
    evals = [r for r in recs if r.get("kind") == "eval"]
    fig = {"precision": prec, "init_from": str(src), "init_from_what": src_what, "steps": s.short,
           "micro_batch": s.mb_short, **_losses_summary(train)}
    rep = getattr(res["task"], "init_report", None)
    if rep is not None:
        fig.update(init_loaded=len(rep.loaded), init_missing=len(rep.missing),
                   init_dropped=len(rep.unexpected), init_kind=rep.kind)
    last_eval = evals[-1] if evals else {}
    for k in ("val_top1", "val_top1_ema", "val_loss", "val_loss_ema"):
        fig[k] = last_eval.get(k)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    fig["ema_in_checkpoint"] = bool(ckpts) and any((c / "task_state.safetensors").exists() for c in ckpts)
    fig["samples_per_sec"] = train[-1].get("samples_per_sec") if train else None
    problems = _basic_problems(res, train, s.short, fig)
    if not fig.get("init_loaded"):
        problems.append(f"no weights loaded from {src}")
    if fig["val_top1_ema"] is None:
        problems.append("no EMA evaluation (val_top1_ema) in metrics.jsonl")
    if not fig["ema_in_checkpoint"]:
        problems.append("the checkpoint has no task_state.safetensors (EMA)")
    summary = (f"from {src_what}: {fig.get('init_loaded', 0)} tensors loaded, {fig.get('init_dropped', 0)} dropped; "
               f"{_loss_text(fig)}; val top-1 {_fmt(fig['val_top1'], '.3f')}, EMA {_fmt(fig['val_top1_ema'], '.3f')}; "
               f"EMA in checkpoint {fig['ema_in_checkpoint']}")
    return _verdict(problems, figures=fig, summary=summary)


def check_zero3(ctx: Ctx) -> dict:
    s = ctx.s
    prec = ctx.precision("fp16")
    run_dir = ctx.fresh_dir("zero3")
    res = ctx.train("mim", run_dir, _mim_sets(ctx, s.short, prec, s.mb_short, extra=["train.act_ckpt=all"]),
                    ds_config="zero3.json")
    train = train_records(read_records(run_dir))
    fig = {"precision": prec, "zero": 3, "act_ckpt": "all", "micro_batch": s.mb_short, "steps": s.short,
           **_losses_summary(train)}
    fig.update(_perf_and_memory(ctx, res, run_dir, 3, True, s.mb_short))
    cfg_path = run_dir / "ds_config.json"
    if cfg_path.exists():
        fig["ds_zero_stage"] = json.loads(cfg_path.read_text()).get("zero_optimization", {}).get("stage")
    problems = _basic_problems(res, train, s.short, fig)
    if fig.get("ds_zero_stage") != 3:
        problems.append(f"ran with ZeRO stage {fig.get('ds_zero_stage')}")
    notes = [fig["mfu_note"]] if fig.get("mfu_note") else []
    return _verdict(problems, figures=fig, notes=notes, summary=f"{_loss_text(fig)}; {_perf_text(fig)}")


def run_check(ctx: Ctx, name: str) -> dict:
    """One check, never raising: its row (name, status, summary, figures, notes, error, seconds)."""
    t0 = time.time()
    print(f"\n===== gpu_smoke: {name} =====", flush=True)
    with captured() as lines:
        try:
            if name == "env":
                row = check_env(ctx)
            elif name == "sdpa":
                row = check_sdpa(ctx)
            elif name.startswith("mim_"):
                row = check_mim(ctx, name.split("_", 1)[1])
            elif name == "resume":
                row = check_resume(ctx)
            elif name == "tokenizer":
                row = check_tokenizer(ctx)
            elif name == "finetune":
                row = check_finetune(ctx)
            elif name == "zero3":
                row = check_zero3(ctx)
            else:
                raise ValueError(f"unknown check {name}")
        except BaseException as e:  # noqa: BLE001 - one check's crash is its row, the others still run
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            first = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
            row = {"status": "FAIL", "summary": first, "error": first}
        tail = list(lines)[-40:]
    ctx.cleanup()
    row = {"name": name, "status": row.get("status", "FAIL"), "seconds": round(time.time() - t0, 1),
           "summary": row.get("summary", ""), "figures": row.get("figures", {}), "notes": row.get("notes", []),
           "error": row.get("error", "")}
    if row["status"] == "FAIL":
        row["error_tail"] = "\n".join(tail)
    print(f"===== gpu_smoke: {name}: {row['status']} ({row['seconds']} s) {row['summary'][:300]}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# table, JSON, modes
# ----------------------------------------------------------------------------------------------
def print_table(rows: list[dict], title: str) -> None:
    import textwrap
    w_name = max([5] + [len(r["name"]) for r in rows])
    print("\n" + title)
    head = f"{'check':<{w_name}}  {'status':<6}  {'sec':>6}  key figures"
    print(head + "\n" + "-" * max(len(head), 100))
    for r in rows:
        text = r["summary"] or ""
        if r["status"] == "FAIL" and r.get("error") and r["error"] not in text:
            text += (" | " if text else "") + "FAILED: " + r["error"]
        for n in r.get("notes") or []:
            text += f" | note: {n}"
        wrapped = textwrap.wrap(text, 110) or [""]
        print(f"{r['name']:<{w_name}}  {r['status']:<6}  {r['seconds']:>6.1f}  {wrapped[0]}")
        for more in wrapped[1:]:
            print(f"{'':<{w_name}}  {'':<6}  {'':>6}  {more}")
    print()


def report(a, mode: str, rows: list[dict], started: float, settings: dict, device: dict, message: str = "") -> int:
    failed = [r["name"] for r in rows if r["status"] == "FAIL"]
    status = "skipped" if mode == "no-gpu" else ("failed" if failed else "ok")
    doc = {"tool": "benchmarks/gpu_smoke.py", "version": 1, "mode": mode, "status": status,
           "message": message or (f"failed: {', '.join(failed)}" if failed else "all checks ok"),
           "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
           "seconds": round(time.time() - started, 1), "argv": sys.argv[1:], "settings": settings,
           "device": device, "rows": rows}
    out = Path(a.out)
    _write_json(out, doc)
    if not a.child:
        title = {"gpu": "GPU smoke test", "cpu-selftest": "GPU smoke test -- CPU SELF-TEST (fp32, tiny model)",
                 "no-gpu": "GPU smoke test -- skipped (no GPU)"}[mode]
        print_table(rows, f"{title}: {doc['message']} ({doc['seconds']:.0f} s)")
        print(f"JSON: {out}")
    return 1 if failed else 0


def _no_gpu(a, started: float) -> int | None:
    """None when a GPU is usable; otherwise write the skipped (or failed) JSON and return the status."""
    import torch
    if torch.cuda.is_available():
        return None
    expected, reason = None, "torch.cuda.is_available() is False"
    try:
        from beit_scale.dist.device import cuda_unusable_reason, gpus_expected
        expected = gpus_expected()
        if expected:
            reason = cuda_unusable_reason()
    except ImportError:
        pass
    device = {"torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
              "cuda_available": False, "gpus_expected": expected, "reason": reason}
    if expected:
        msg = f"GPUs are expected here ({expected}) but CUDA is unusable: {reason}"
        print(f"gpu_smoke: {msg}", file=sys.stderr)
        row = {"name": "env", "status": "FAIL", "seconds": 0.0, "summary": msg, "figures": device,
               "notes": [], "error": msg}
        return report(a, "gpu", [row], started, {}, device, msg)
    msg = ("no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check, no training started. "
           "Run this on a GPU machine (bash benchmarks/gpu_smoke.sh).")
    print(f"gpu_smoke: {msg}")
    rows = [{"name": n, "status": "skip", "seconds": 0.0, "summary": "no GPU", "figures": {}, "notes": [],
             "error": ""} for n in a.checks]
    _write_json(Path(a.out), {"tool": "benchmarks/gpu_smoke.py", "version": 1, "mode": "no-gpu",
                              "status": "skipped", "message": msg,
                              "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                              "seconds": round(time.time() - started, 1), "argv": sys.argv[1:], "settings": {},
                              "device": device, "rows": rows})
    print(f"JSON: {a.out}")
    return 0


def _device_summary(selftest: bool) -> dict:
    import torch
    d = {"torch": torch.__version__, "torch_cuda_build": torch.version.cuda}
    if not selftest and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / GiB, 1))
    else:
        d["device"] = "cpu"
    return d


def _isolated(a, runs_dir: Path, started: float, settings: Settings, mode: str) -> int:
    """Each check in its own process (this script with --only CHECK --child); rows merged here."""
    rows = []
    for name in a.checks:
        child_out = runs_dir / f"child_{name}.json"
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--only", name, "--out", str(child_out),
               "--runs-dir", str(runs_dir), "--keep", "--child"]
        for opt, val in (("--steps", a.steps), ("--model", a.model), ("--micro-batch", a.micro_batch),
                         ("--workers", a.workers)):
            if val is not None:
                cmd += [opt, str(val)]
        if a.cpu_selftest:
            cmd.append("--cpu-selftest")
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=REPO).returncode
        try:
            child = json.loads(child_out.read_text())
            rows += child["rows"]
        except (OSError, ValueError, KeyError):
            rows.append({"name": name, "status": "FAIL", "seconds": round(time.time() - t0, 1),
                         "summary": f"the check's process exited with status {rc} and wrote no result",
                         "figures": {}, "notes": [], "error": f"exit status {rc}"})
    return _finish(a, mode, rows, started, settings, _device_summary(a.cpu_selftest), runs_dir)


def _finish(a, mode, rows, started, settings: Settings, device: dict, runs_dir: Path) -> int:
    rc = report(a, mode, rows, started, settings.to_dict(), device)
    if not a.keep and not a.child and runs_dir.exists():
        shutil.rmtree(runs_dir, ignore_errors=True)
    elif not a.child:
        print(f"run dirs kept in {runs_dir}")
    return rc


def main(argv=None) -> int:
    a = parse_args(argv)
    started = time.time()
    if a.cpu_selftest:
        # CPU on purpose, even on a GPU machine: DeepSpeed's own switch, and no CUDA device for torch.
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    mode = "cpu-selftest" if a.cpu_selftest else "gpu"
    if not a.cpu_selftest:
        status = _no_gpu(a, started)
        if status is not None:
            return status
    out = Path(a.out)
    runs_dir = Path(a.runs_dir) if a.runs_dir else out.parent / f"{out.stem}_runs"
    runs_dir = runs_dir.resolve()
    settings = Settings(a, a.cpu_selftest)
    if a.isolate and not a.child:
        return _isolated(a, runs_dir, started, settings, mode)
    runs_dir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(a, settings, runs_dir, a.cpu_selftest)
    import deepspeed  # noqa: F401 - imported before any capture: its log handler keeps the real stdout
    print(f"gpu_smoke: {mode}, checks {', '.join(a.checks)}; model {settings.model}, MIM {settings.steps} steps "
          f"x micro batch {settings.mb}, {settings.workers} data workers; runs in {runs_dir}", flush=True)
    rows = []
    for name in a.checks:
        rows.append(run_check(ctx, name))
        _write_json(out, {"tool": "benchmarks/gpu_smoke.py", "mode": mode, "status": "running",
                          "rows": rows})           # partial results survive a kill
    device = ctx.device_info or _device_summary(a.cpu_selftest)
    rc = _finish(a, mode, rows, started, settings, device, runs_dir)   # the JSON first, then the teardown
    try:
        import torch.distributed as dist
        if rc == 0:
            from beit_scale.train.engine import shutdown_distributed
            shutdown_distributed()
        elif dist.is_initialized():      # after a failure: no barrier (one rank, nobody to wait for)
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        print(f"note: process group shutdown: {e}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
