"""Scaling study: a grid of short, real MIM trainings, measured and set beside the memory model.

Each grid point (model x ZeRO stage x activation checkpointing x micro batch x precision x ranks
[x nodes]) is one run of ``launch/pretrain.py`` in its own process group (plain ``python`` for one
rank, ``python -m torch.distributed.run`` for several, ``srun`` under Slurm), for
``warmup_steps + measure_steps`` steps with ``train.log_every=1``. What a point yields comes from the
trainer's metrics.jsonl, over the measured steps only:

* throughput: global batch / mean step time (each step's time is global_batch / samples_per_sec);
* achieved TFLOP/s per device (the task's counted FLOPs per sample x throughput / ranks) and MFU
  against the device's dense peak (``peaks.peak_flops`` on GPU; on CPU a matmul peak measured once
  per study and shared by the ranks of one machine);
* peak memory per rank (the worst rank): ``torch.cuda.max_memory_allocated`` on GPU; on CPU the
  trainer's tensor high-water mark over the warm-up steps (``train.cpu_mem_profile_steps``,
  ``beit_scale/train/mem_probe.py``), so both sides count the same thing: allocated tensors;
* the analytic prediction (``memory.estimate``) for the same point, and the ratio measured/predicted.

A failed point is a result, not a crash: CUDA "out of memory" in its log -> status ``oom``; any
other failure -> ``failed`` with the last lines of its log; the grid goes on. Results are appended
to ``<out>/results.jsonl`` (and ``results.csv`` is rewritten from it), so a re-run skips the points
already there. ``write_outputs`` makes the CSV, three PNG plots and ``report.md``.

    python launch/scaling_study.py configs/scaling/cpu_smoke.yaml [--out DIR] [--retry-failed]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
GiB = 2 ** 30
TOLERANCE = 0.15          # the issue's bar for prediction vs measurement
OOM_PATTERNS = ("out of memory", "outofmemoryerror", "cuda error: out of memory")
DONE_STATUSES = ("ok", "oom", "failed", "timeout")

__all__ = ["StudyConfig", "Point", "load_study", "grid_points", "make_tokenizer", "device_peak",
           "point_command", "srun_cpus_per_task", "study_dir", "run_point", "classify_failure", "error_summary", "summarize_run", "predict", "run_study", "load_results",
           "write_outputs", "main"]


# ----------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    model: str
    zero: int
    act_ckpt: bool
    micro_batch: int
    precision: str
    ranks: int            # ranks per node (GPUs per node, or CPU processes)
    nodes: int = 1

    @property
    def world(self) -> int:
        return self.ranks * self.nodes

    @property
    def id(self) -> str:
        return (f"{self.model}-z{self.zero}-{'ckpt' if self.act_ckpt else 'nockpt'}-mb{self.micro_batch}"
                f"-{self.precision}-r{self.ranks}x{self.nodes}")


@dataclass
class StudyConfig:
    models: list = field(default_factory=lambda: ["beit_debug"])
    zero: list = field(default_factory=lambda: [1])
    act_ckpt: list = field(default_factory=lambda: [False])
    micro_batch: list = field(default_factory=lambda: [2])
    precision: list = field(default_factory=lambda: ["fp32"])
    ranks: list = field(default_factory=lambda: [1])
    nodes: list = field(default_factory=lambda: [1])
    warmup_steps: int = 2
    measure_steps: int = 5
    out_dir: str = "runs/scaling_study"
    tokenizer_vocab: int = 8192          # random dVAE made once per study (targets, not quality)
    tokenizer_hidden: int = 64
    launcher: str = "auto"               # auto | local | srun
    timeout_s: float = 1800.0            # per point
    num_workers: int = 2                 # data.num_workers of each run
    extra_sets: list = field(default_factory=list)   # more --set k=v for every point
    ds_config_dir: str = "ds_configs"    # zero{N}.json inside
    keep_checkpoints: bool = False       # the trainer saves one at the end; a study does not need it
    # srun --cpus-per-task of each point (CPU cores per rank: the rank + its data workers).
    # 0: SRUN_CPUS_PER_TASK, else the allocation's SLURM_CPUS_PER_TASK (sbatch --cpus-per-task),
    # which srun 22.05+ does not inherit by itself; neither set: srun's default of 1 core.
    cpus_per_task: int = 0

    def validate(self) -> None:
        for name in ("models", "zero", "act_ckpt", "micro_batch", "precision", "ranks", "nodes"):
            v = getattr(self, name)
            if not isinstance(v, list) or not v:
                raise ValueError(f"study key {name!r} must be a non-empty list, got {v!r}")
        if self.warmup_steps < 1 or self.measure_steps < 1:
            raise ValueError("warmup_steps and measure_steps must be >= 1 (the first step includes "
                             "start-up and is never measured)")
        if not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 0:
            raise ValueError(f"cpus_per_task={self.cpus_per_task!r}: expected an integer >= 0 "
                             "(0 = take SLURM_CPUS_PER_TASK from the allocation)")
        if self.launcher not in ("auto", "local", "srun"):
            raise ValueError(f"launcher={self.launcher!r}: expected auto, local or srun")
        from beit_scale.models.zoo import list_models
        bad = [m for m in self.models if m not in list_models()]
        if bad:  # every point of such a model would fail after a process start; say it now
            raise ValueError(f"unknown model(s) {bad} in the study grid; zoo models: {', '.join(list_models())}")


def load_study(path: Optional[str | os.PathLike] = None, **overrides) -> StudyConfig:
    """A StudyConfig from YAML (keys = the dataclass fields) plus keyword overrides."""
    import yaml
    raw = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown study key(s) {unknown} in {path}; known: {sorted(known)}")
    for k, v in raw.items():   # a scalar in YAML means a one-value axis
        if k in ("models", "zero", "act_ckpt", "micro_batch", "precision", "ranks", "nodes",
                 "extra_sets") and not isinstance(v, list):
            raw[k] = [v]
    cfg = StudyConfig(**raw)
    cfg.act_ckpt = [_as_bool(x) for x in cfg.act_ckpt]
    cfg.validate()
    return cfg


def _as_bool(x) -> bool:
    if isinstance(x, str):
        return x.lower() in ("1", "true", "yes", "on", "all")
    return bool(x)


def grid_points(cfg: StudyConfig) -> list[Point]:
    return [Point(m, int(z), bool(a), int(b), str(p), int(r), int(n)) for m, z, a, b, p, r, n in
            itertools.product(cfg.models, cfg.zero, cfg.act_ckpt, cfg.micro_batch, cfg.precision,
                              cfg.ranks, cfg.nodes)]


# ----------------------------------------------------------------------------------------------
# per-study setup: tokenizer, device peak
# ----------------------------------------------------------------------------------------------
def make_tokenizer(out_dir: Path, vocab: int, hidden: int = 64) -> Path:
    """A random dVAE tokenizer (MIM needs targets, not good ones), made once per study."""
    path = out_dir / f"tokenizer_v{vocab}_h{hidden}.safetensors"
    if not path.exists():
        import torch
        from beit_scale.models.dvae import DVAE, DVAEConfig, save_tokenizer
        torch.manual_seed(0)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".tmp." + path.name)
        save_tokenizer(DVAE(DVAEConfig(vocab_size=vocab, image_size=112, hidden_dim=hidden)), tmp)
        os.replace(tmp, path)
    return path


def _tokenizer_params(path: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def device_peak(out_dir: Path) -> dict:
    """What MFU divides by. GPU: the datasheet table. CPU: a measured fp32 matmul rate of the whole
    machine (cached in out_dir/device.json so that a resumed study uses the same figure)."""
    cache = out_dir / "device.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import torch
    if torch.cuda.is_available():
        from beit_scale.scaling.peaks import identify_gpu
        props = torch.cuda.get_device_properties(0)
        m = identify_gpu(props.name, props.total_memory)
        info = {"kind": "cuda", "name": props.name, "memory_bytes": props.total_memory,
                "table": m.spec.name if m.spec else None,
                "peak_tflops": dict(m.spec.tflops) if m.spec else {}, "peak_reason": m.reason}
        if m.spec is None:  # said once per study (the figure is cached below): no MFU column
            print(f"scaling study: no datasheet peak, MFU will not be reported: {m.reason}",
                  file=sys.stderr, flush=True)
    else:
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(5):          # the fastest repeat: the least disturbed by other jobs
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        tflops = 2 * n ** 3 / best / 1e12
        info = {"kind": "cpu", "name": f"CPU x{os.cpu_count()} ({torch.get_num_threads()} threads)",
                "memory_bytes": None, "table": "measured 2048x2048 fp32 matmul",
                "peak_tflops": {"fp32": tflops, "fp16": tflops, "bf16": tflops}}
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(info, indent=2))
    return info


def _peak_per_device(dev: dict, precision: str, world_on_machine: int) -> Optional[float]:
    tf = dev.get("peak_tflops", {}).get(precision)
    if tf is None:
        return None
    # CPU ranks share one machine's cores: each rank's share of the measured peak.
    return tf / world_on_machine if dev["kind"] == "cpu" else tf


# ----------------------------------------------------------------------------------------------
# running one point
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_srun_points = 0


def _srun_master_port() -> int:
    """A rendezvous port for the next srun point: from the job's port range (below the ephemeral
    ports, see dist/env.py), a different one for each point so a port still in TIME_WAIT from the
    previous point is never reused, and one that binds on this (the first) node."""
    global _srun_points
    from beit_scale.dist.env import SLURM_PORTS, slurm_port
    job = os.environ.get("SLURM_JOB_ID", "0")
    start = SLURM_PORTS.index(slurm_port(int(job) if job.isdigit() else 0)) + _srun_points
    _srun_points += 1
    for k in range(len(SLURM_PORTS)):
        port = SLURM_PORTS[(start + k) % len(SLURM_PORTS)]
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    return _free_port()


def _launcher(cfg: StudyConfig) -> str:
    if cfg.launcher != "auto":
        return cfg.launcher
    return "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "local"


def srun_cpus_per_task(cfg: StudyConfig, environ=None) -> Optional[int]:
    """CPU cores per task for the points' srun steps: the study's cpus_per_task, else
    SRUN_CPUS_PER_TASK, else the allocation's SLURM_CPUS_PER_TASK; None when nothing says. Passed
    explicitly because srun 22.05+ does not inherit the allocation's --cpus-per-task, and without it
    every rank and its data-loader workers would share one core."""
    environ = os.environ if environ is None else environ
    if cfg.cpus_per_task:
        return int(cfg.cpus_per_task)
    for name in ("SRUN_CPUS_PER_TASK", "SLURM_CPUS_PER_TASK"):
        v = environ.get(name, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return None


def point_command(cfg: StudyConfig, p: Point, run_dir: Path, tokenizer: Path) -> list[str]:
    """The exact command line of one point (also written to its folder as command.txt)."""
    steps = cfg.warmup_steps + cfg.measure_steps
    args = ["launch/pretrain.py", "--deepspeed_config", str(Path(cfg.ds_config_dir) / f"zero{p.zero}.json"),
            "--run_dir", str(run_dir)]
    sets = [f"model.name={p.model}", f"train.micro_batch={p.micro_batch}",
            f"train.global_batch={p.micro_batch * p.world}", f"train.max_steps={steps}",
            f"train.act_ckpt={'all' if p.act_ckpt else 'none'}", f"precision={p.precision}",
            "train.log_every=1", "checkpoint.every_steps=0", "train.eval_batches=1",
            "train.image_log_every=0", "optim.warmup_steps=1", f"data.num_workers={cfg.num_workers}",
            f"tokenizer.checkpoint={tokenizer}", f"tokenizer.vocab_size={cfg.tokenizer_vocab}",
            "checkpoint.resume=none",
            # CPU: the warm-up steps also track tensor memory (profiler; ignored on GPU)
            f"train.cpu_mem_profile_steps={max(1, cfg.warmup_steps)}", *cfg.extra_sets]
    for s in sets:
        args += ["--set", s]
    py = [sys.executable, "-u"]
    if _launcher(cfg) == "srun":
        cpus = srun_cpus_per_task(cfg)
        return ["srun", f"--nodes={p.nodes}", f"--ntasks={p.world}", f"--ntasks-per-node={p.ranks}",
                *([f"--cpus-per-task={cpus}"] if cpus else []), "--kill-on-bad-exit=1", *py, *args]
    if p.world == 1:
        return [*py, *args]
    return [*py, "-m", "torch.distributed.run", f"--nproc_per_node={p.ranks}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_point(cfg: StudyConfig, p: Point, out_dir: Path, tokenizer: Path, dev: dict) -> dict:
    """Run one point to completion and return its result row (never raises for a failed run)."""
    run_dir = out_dir / "points" / p.id
    if run_dir.exists():            # a half-finished earlier attempt: start clean
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = point_command(cfg, p, run_dir, tokenizer)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    log_path = run_dir / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dev["kind"] == "cpu":        # ranks share the cores: no oversubscription
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // p.world))
    if _launcher(cfg) == "srun":
        env["MASTER_PORT"] = str(_srun_master_port())
    else:   # a local run inside an allocation must not take the batch step's Slurm view of ranks
        for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
                  "SLURM_LOCALID", "SLURM_NODEID"):
            env.pop(k, None)
    if _launcher(cfg) == "local" and p.nodes > 1:
        return _row(p, "failed", error=f"{p.nodes} nodes need Slurm (launcher srun); this is a local run")
    t0 = time.time()
    status, error = "ok", ""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)     # the point's own process group only
            proc.wait()
            rc, status, error = None, "timeout", f"no result after {cfg.timeout_s:.0f} s"
    wall = time.time() - t0
    if status == "ok" and rc != 0:
        text = log_path.read_text(errors="replace")
        status = classify_failure(text)
        error = f"exit status {rc}: " + error_summary(text)
    row = _row(p, status, error=error, wall_s=wall)
    if status == "ok":
        row.update(summarize_run(run_dir, cfg.warmup_steps, p.world))
        if row.get("measured_steps", 0) == 0:
            row.update(status="failed", error="the run finished but logged no measured step: " + _tail(log_path))
    if not cfg.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    row.update(predict(p, row.get("precision_effective") or p.precision, cfg, tokenizer, dev))
    _mfu(row, p, dev)
    return row


def classify_failure(log_text: str) -> str:
    """'oom' when any rank ran out of GPU memory (the other ranks then die of broken collectives,
    so the whole log is searched), else 'failed'."""
    lowered = log_text.lower()
    return "oom" if any(s in lowered for s in OOM_PATTERNS) else "failed"


def error_summary(log_text: str, n_tail: int = 8) -> str:
    """The lines that say what went wrong ('error: ...', 'SomethingError: ...', from any rank; the
    launcher's own ChildFailedError report is noise), then the last lines of the log."""
    import re
    keys, seen = [], set()
    for ln in log_text.splitlines():
        t = ln.strip()
        if (t.startswith("error:") or re.search(r"\w(Error|Exception): ", t)) and "ChildFailedError" not in t \
                and t not in seen:
            seen.add(t)
            keys.append(t)
    tail = log_text.splitlines()[-n_tail:]
    return "\n".join(keys[:5] + ["--- last lines ---"] + tail)


def _row(p: Point, status: str, error: str = "", wall_s: float = 0.0) -> dict:
    return dict(id=p.id, model=p.model, zero=p.zero, act_ckpt=p.act_ckpt, micro_batch=p.micro_batch,
                precision=p.precision, ranks=p.ranks, nodes=p.nodes, world=p.world, status=status,
                error=error[-2000:], wall_s=round(wall_s, 1))


def summarize_run(run_dir: Path, warmup_steps: int, world: int) -> dict:
    """Throughput, FLOP/s and peak memory from a finished run's metrics.jsonl (measured steps only)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    train = [r for r in rows if r.get("kind", "train") == "train"]
    measured = [r for r in train if r["step"] > warmup_steps and r.get("samples_per_sec")]
    out: dict = {"measured_steps": len(measured)}
    ds_path = run_dir / "ds_config.json"
    if ds_path.exists():
        ds = json.loads(ds_path.read_text())
        out["precision_effective"] = ("fp16" if ds.get("fp16", {}).get("enabled") else
                                      "bf16" if ds.get("bf16", {}).get("enabled") else "fp32")
        out["global_batch"] = ds.get("train_batch_size")
    if not measured:
        return out
    gb = out.get("global_batch") or 0
    step_times = [gb / r["samples_per_sec"] for r in measured] if gb else []
    if step_times:
        mean_t = sum(step_times) / len(step_times)
        out["step_time_s"] = mean_t
        out["samples_per_sec"] = gb / mean_t
        out["samples_per_sec_per_device"] = gb / mean_t / world
    r = measured[-1]
    if r.get("tflops_per_device") and r.get("samples_per_sec"):
        flops_per_sample = r["tflops_per_device"] * 1e12 * world / r["samples_per_sec"]
        out["flops_per_sample"] = flops_per_sample
        if "samples_per_sec" in out:
            out["tflops_per_device"] = flops_per_sample * out["samples_per_sec"] / world / 1e12
    last = train[-1]
    for k in ("peak_mem_bytes", "peak_mem_base_bytes", "peak_mem_kind", "loss"):
        if k in last:
            out[k] = last[k]
    scales = [r["loss_scale"] for r in train if "loss_scale" in r]
    if scales:
        out["loss_scale"] = scales[-1]
    out["skipped_steps"] = last.get("skipped_steps", 0)
    if out.get("peak_mem_kind") == "cpu_max_rss":
        out["measured_mem_bytes"] = out["peak_mem_bytes"] - out.get("peak_mem_base_bytes", 0)
    elif "peak_mem_bytes" in out:
        out["measured_mem_bytes"] = out["peak_mem_bytes"]
    return out


def predict(p: Point, precision: str, cfg: StudyConfig, tokenizer: Path, dev: dict) -> dict:
    """The memory model's figure to compare with the measurement of this point: what the
    allocator hands out, ``total - overhead`` (the overhead is the CUDA context and fragmentation
    allowance, invisible to max_memory_allocated and to the CPU tensor probe), with the attention
    path the device runs ('sdpa' on GPU, 'math' on CPU), plus the study's own dVAE weights."""
    from beit_scale.models.zoo import get_config
    from beit_scale.scaling.memory import estimate
    try:
        mcfg = get_config(p.model, vocab_size=cfg.tokenizer_vocab)
        ds = json.loads((REPO / cfg.ds_config_dir / f"zero{p.zero}.json").read_text())
        z = ds.get("zero_optimization", {})
        est = estimate(mcfg, zero=p.zero, gpus=p.world, micro_batch=p.micro_batch, act_ckpt=p.act_ckpt,
                       precision=precision, task="mim",
                       attention="sdpa" if dev["kind"] == "cuda" else "math", tokenizer=None,
                       reduce_bucket_size=int(z.get("reduce_bucket_size", 5e8)),
                       overlap_comm=bool(z.get("overlap_comm", False)))
    except Exception as e:  # noqa: BLE001 - a bogus model name is the run's failure, not ours
        return {"predict_error": f"{type(e).__name__}: {e}"}
    a = 2 if precision in ("fp16", "bf16") else 4
    tok = _tokenizer_params(tokenizer) * a
    out = {"pred_model_states_bytes": est.model_states_bytes, "pred_activations_bytes": est.activations_bytes,
           "pred_buffers_bytes": est.buffers_bytes, "pred_total_bytes": est.total_bytes + tok,
           "num_params": est.num_params}
    # What the allocator hands out: total - overhead (the overhead is the CUDA context and the
    # fragmentation allowance, which neither max_memory_allocated nor the CPU probe sees).
    out["pred_compare_bytes"] = est.total_bytes - est.overhead_bytes + tok
    out["pred_compare_what"] = "allocated (total - overhead)"
    return out


def _mfu(row: dict, p: Point, dev: dict) -> None:
    if "measured_mem_bytes" in row and row.get("pred_compare_bytes"):
        ratio = row["measured_mem_bytes"] / row["pred_compare_bytes"]
        row["mem_ratio"] = ratio
        row["mem_within_15pct"] = abs(ratio - 1) <= TOLERANCE
    prec = row.get("precision_effective") or p.precision
    world_on_machine = p.ranks if dev["kind"] == "cpu" else 1
    peak = _peak_per_device(dev, prec, world_on_machine)
    if peak and row.get("tflops_per_device"):
        row["peak_tflops_per_device"] = peak
        row["mfu"] = row["tflops_per_device"] / peak


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------
def study_dir(cfg: StudyConfig) -> Path:
    """out_dir, absolute (relative paths are taken from the current directory)."""
    return Path(cfg.out_dir).expanduser().resolve()


def load_results(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "results.jsonl"
    if not path.exists():
        return []
    rows = {}
    for ln in path.read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            rows[r["id"]] = r      # the newest attempt of a point wins
    return list(rows.values())


def run_study(cfg: StudyConfig, retry_failed: bool = False, progress: bool = True) -> list[dict]:
    out_dir = study_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = grid_points(cfg)
    done = {r["id"]: r for r in load_results(out_dir)}
    skip_status = ("ok", "oom") if retry_failed else DONE_STATUSES
    todo = [p for p in points if done.get(p.id, {}).get("status") not in skip_status]
    if progress:
        print(f"scaling study: {len(points)} points, {len(points) - len(todo)} already done, "
              f"{len(todo)} to run -> {out_dir}", flush=True)
    dev = device_peak(out_dir)
    tokenizer = make_tokenizer(out_dir, cfg.tokenizer_vocab, cfg.tokenizer_hidden)
    from tqdm import tqdm
    bar = tqdm(total=len(points), initial=len(points) - len(todo), disable=not progress,
               desc="scaling study", unit="point", dynamic_ncols=True)
    with open(out_dir / "results.jsonl", "a") as f:
        for p in todo:
            bar.set_postfix_str(p.id)
            row = run_point(cfg, p, out_dir, tokenizer, dev)
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[p.id] = row
            bar.update(1)
            if progress:
                bar.write(_one_line(row))
            _write_csv(out_dir, [done[q.id] for q in points if q.id in done])
    bar.close()
    rows = [done[p.id] for p in points if p.id in done]
    write_outputs(out_dir, rows, dev, cfg)
    return rows


def _one_line(r: dict) -> str:
    if r["status"] != "ok":
        first = (r.get("error") or "").splitlines()[0:1]
        return f"  {r['id']}: {r['status'].upper()} {first[0] if first else ''}"
    mem = r.get("measured_mem_bytes")
    return (f"  {r['id']}: {r.get('samples_per_sec_per_device', float('nan')):.2f} img/s/device, "
            f"{r.get('tflops_per_device', float('nan')):.4f} TFLOP/s/device, "
            f"MFU {100 * r.get('mfu', float('nan')):.1f}%, mem {mem / GiB if mem else float('nan'):.3f} GiB "
            f"(pred {r.get('pred_compare_bytes', 0) / GiB:.3f})")


CSV_COLUMNS = ["id", "status", "model", "num_params", "zero", "act_ckpt", "micro_batch", "precision",
               "precision_effective", "ranks", "nodes", "world", "global_batch", "measured_steps",
               "step_time_s", "samples_per_sec", "samples_per_sec_per_device", "tflops_per_device",
               "peak_tflops_per_device", "mfu", "peak_mem_kind", "peak_mem_bytes", "peak_mem_base_bytes",
               "measured_mem_bytes", "pred_compare_bytes", "pred_compare_what", "mem_ratio",
               "mem_within_15pct", "pred_model_states_bytes", "pred_activations_bytes",
               "pred_buffers_bytes", "pred_total_bytes", "loss", "loss_scale", "skipped_steps", "wall_s",
               "error"]


def _write_csv(out_dir: Path, rows: list[dict]) -> Path:
    path = out_dir / "results.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def write_outputs(out_dir: Path, rows: list[dict], dev: dict, cfg: Optional[StudyConfig] = None) -> dict:
    out_dir = Path(out_dir)
    paths = {"csv": _write_csv(out_dir, rows)}
    paths.update(_plots(out_dir, rows))
    paths["report"] = _report(out_dir, rows, dev, cfg, paths)
    return paths


def _plots(out_dir: Path, rows: list[dict]) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok" and r.get("samples_per_sec_per_device")]
    paths = {}

    # 1. throughput vs model size, one line per ZeRO stage (best configuration per model)
    fig, ax = plt.subplots(figsize=(6, 4))
    for z in sorted({r["zero"] for r in ok}):
        best = {}
        for r in ok:
            if r["zero"] == z:
                n = r.get("num_params") or 0
                best[n] = max(best.get(n, 0), r["samples_per_sec_per_device"])
        xs = sorted(best)
        ax.plot([x / 1e6 for x in xs], [best[x] for x in xs], "o-", label=f"ZeRO {z}")
    ax.set(xlabel="parameters (M)", ylabel="images/s per device", title="Throughput vs model size (best per model)")
    _finish(ax, ok, log_x=True)
    paths["plot_throughput"] = _save(fig, out_dir / "throughput_vs_model.png")

    # 2. memory vs micro batch: measured (solid) and predicted (dashed) per model/ZeRO/ckpt
    fig, ax = plt.subplots(figsize=(6, 4))
    have = [r for r in rows if r.get("measured_mem_bytes") is not None and r["status"] == "ok"]
    groups = sorted({(r["model"], r["zero"], r["act_ckpt"], r["precision"], r["world"]) for r in have}, key=str)
    for i, g in enumerate(groups):
        pts = sorted((r for r in have if (r["model"], r["zero"], r["act_ckpt"], r["precision"], r["world"]) == g),
                     key=lambda r: r["micro_batch"])
        label = f"{g[0]} z{g[1]} {'ckpt' if g[2] else 'no ckpt'} {g[3]} x{g[4]}"
        line, = ax.plot([r["micro_batch"] for r in pts], [r["measured_mem_bytes"] / GiB for r in pts], "o-", label=label)
        pred = [(r["micro_batch"], r["pred_compare_bytes"] / GiB) for r in pts if r.get("pred_compare_bytes")]
        if pred:
            ax.plot(*zip(*pred), "x--", color=line.get_color())
    ax.set(xlabel="micro batch per rank", ylabel="GiB per rank",
           title="Peak memory vs micro batch (solid measured, dashed model)")
    _finish(ax, have)
    paths["plot_memory"] = _save(fig, out_dir / "memory_vs_micro_batch.png")

    # 3. scaling efficiency vs ranks: throughput(n) / (n x per-rank throughput at the fewest ranks)
    fig, ax = plt.subplots(figsize=(6, 4))
    eff_rows = []
    for g in sorted({(r["model"], r["zero"], r["act_ckpt"], r["micro_batch"], r["precision"]) for r in ok}, key=str):
        pts = sorted((r for r in ok if (r["model"], r["zero"], r["act_ckpt"], r["micro_batch"], r["precision"]) == g),
                     key=lambda r: r["world"])
        if len(pts) < 2:
            continue
        base = pts[0]["samples_per_sec_per_device"]
        xs = [r["world"] for r in pts]
        ys = [r["samples_per_sec_per_device"] / base for r in pts]
        eff_rows.append(pts)
        ax.plot(xs, ys, "o-", label=f"{g[0]} z{g[1]} mb{g[3]}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="ranks (total)", ylabel="scaling efficiency", title="Weak-scaling efficiency vs ranks")
    _finish(ax, eff_rows)
    paths["plot_scaling"] = _save(fig, out_dir / "scaling_efficiency.png")
    return paths


def _finish(ax, data, log_x=False):
    if not data:
        ax.text(0.5, 0.5, "no data (no successful points\nfor this view)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
        if log_x:
            ax.set_xscale("log")
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v, spec=".3g", scale=1.0, empty="-"):
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return empty
    return format(v / scale, spec)


def _report(out_dir: Path, rows: list[dict], dev: dict, cfg: Optional[StudyConfig], paths: dict) -> Path:
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    cpu = dev["kind"] == "cpu"
    L = ["# Scaling study report", ""]
    L.append(f"Device: {dev['name']} ({'measured' if cpu else 'datasheet'} peak: "
             + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in dev.get("peak_tflops", {}).items())
             + (f", table entry {dev['table']}" if dev.get("table") else "") + ").")
    if not cpu and not dev.get("peak_tflops"):
        L.append(f"No datasheet peak for this device, so no MFU: {dev.get('peak_reason', 'unknown GPU')}.")
    if cfg is not None:
        L.append(f"Each point: {cfg.warmup_steps} warm-up + {cfg.measure_steps} measured steps of real MIM "
                 f"training (launch/pretrain.py), random dVAE tokenizer (vocab {cfg.tokenizer_vocab}).")
    L.append(f"{len(rows)} points: {len(ok)} ok, " + ", ".join(
        f"{sum(r['status'] == s for r in rows)} {s}" for s in ("oom", "failed", "timeout")) + ".")
    L += ["", "Throughput = global batch / mean measured step time; TFLOP/s = counted FLOPs per sample x "
          "throughput / ranks; MFU = that / the device's dense peak"
          + (" (on CPU: the machine's measured matmul rate / ranks on it, since ranks share the cores)." if cpu else "."),
          ""]
    L += ["| point | img/s/dev | step s | TFLOP/s/dev | MFU | measured GiB | predicted GiB | ratio | within 15% |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        L.append(f"| {r['id']} | {_fmt(r.get('samples_per_sec_per_device'), '.2f')} | "
                 f"{_fmt(r.get('step_time_s'), '.3f')} | {_fmt(r.get('tflops_per_device'), '.4f')} | "
                 f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('measured_mem_bytes'), '.3f', GiB)} | "
                 f"{_fmt(r.get('pred_compare_bytes'), '.3f', GiB)} | {_fmt(r.get('mem_ratio'), '.2f')} | "
                 f"{'yes' if r.get('mem_within_15pct') else 'no' if 'mem_ratio' in r else '-'} |")
    L += ["", "## Memory: what is compared", ""]
    if cpu:
        L += ["On CPU there is no allocator counter: *measured* is the trainer's CPU tensor high-water mark "
              "(every CPU tensor allocation and free reported by the torch profiler over the warm-up steps, "
              "summed in time order, from just before the model is built), the CPU analogue of "
              "max_memory_allocated; the worst rank. *predicted* = the memory model's `total_bytes - "
              "overhead_bytes` with attention='math' (what CPU runs), plus the study's dVAE tokenizer weights. "
              "DeepSpeed's bucket buffers are real tensors here even where the OS never backs their pages, so "
              "they are counted on both sides. At least 2 warm-up steps are needed: the first creates the "
              "optimizer state.", ""]
    else:
        L += ["*measured* = `torch.cuda.max_memory_allocated()` of the worst rank; *predicted* = the memory "
              "model's `total_bytes - overhead_bytes` (overhead = CUDA context + fragmentation allowance, "
              "which the allocator's counter does not see) with attention='sdpa', plus the study's own dVAE "
              "tokenizer weights (the model's DALL-E tokenizer spec is switched off: the study uses a smaller "
              "random dVAE).", ""]
    both = [r for r in ok if "mem_ratio" in r]
    if both:
        n_in = sum(bool(r["mem_within_15pct"]) for r in both)
        L += [f"Within 15 %: {n_in} of {len(both)} points.", ""]
    if bad:
        L += ["## Points that did not finish", ""]
        for r in bad:
            tail = (r.get("error") or "").strip().split("--- last lines ---")[0].splitlines()[:3]
            L.append(f"- **{r['id']}**: {r['status']}" + (": `" + " / ".join(t.strip() for t in tail)[-300:] + "`"
                                                        if tail else ""))
        L.append("")
    L += ["## Files", ""]
    for k, p in paths.items():
        L.append(f"- {k}: `{Path(p).name}`")
    L += ["", "![throughput](throughput_vs_model.png)", "![memory](memory_vs_micro_batch.png)",
          "![scaling](scaling_efficiency.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(L))
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a scaling-study grid of short real MIM trainings.")
    ap.add_argument("config", help="study YAML (configs/scaling/*.yaml)")
    ap.add_argument("--out", default=None, help="output folder (overrides out_dir)")
    ap.add_argument("--warmup", type=int, default=None, help="override warmup_steps")
    ap.add_argument("--measure", type=int, default=None, help="override measure_steps")
    ap.add_argument("--launcher", choices=["auto", "local", "srun"], default=None)
    ap.add_argument("--retry-failed", action="store_true", help="run failed/timed-out points again")
    ap.add_argument("--report-only", action="store_true", help="rebuild CSV, plots and report from results.jsonl")
    a = ap.parse_args(argv)
    try:
        cfg = load_study(a.config, out_dir=a.out, warmup_steps=a.warmup, measure_steps=a.measure,
                         launcher=a.launcher)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.report_only:
        out_dir = study_dir(cfg)
        rows = load_results(out_dir)
        paths = write_outputs(out_dir, rows, device_peak(out_dir), cfg)
    else:
        rows = run_study(cfg, retry_failed=a.retry_failed)
        out_dir = study_dir(cfg)
        paths = {"report": out_dir / "report.md"}
    print(f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} points ok; report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
