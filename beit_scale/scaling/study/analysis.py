"""What a finished point yields: its log and metrics.jsonl read into one ``PointResult``, the memory
model's prediction beside the measurement, and MFU against the device's peak.

Measured steps only (step > warmup_steps), from the trainer's train records:

* throughput = global batch / mean ``step_time_s`` (older logs without it: global batch /
  ``samples_per_sec``), and per device;
* TFLOP/s per device = the logged ``flops_per_sample`` (3x the counted forward) x throughput /
  ranks; MFU = that / the device's dense peak (on CPU: the measured peak shared by the ranks);
* peak memory of the worst rank (``peak_mem_bytes``: max_memory_allocated on GPU, the tensor
  high-water mark on CPU) against the memory model's ``total - overhead``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from beit_scale.scaling.study.config import REPO, Point, StudyConfig

TOLERANCE = 0.15          # the bar for prediction vs measurement
OOM_PATTERNS = ("out of memory", "outofmemoryerror", "cuda error: out of memory")
IDENTITY = ("id", "model", "zero", "act_ckpt", "micro_batch", "precision", "ranks", "nodes", "world",
            "status", "error", "wall_s")


@dataclass
class PointResult:
    """One point's result; ``to_row()`` is its line in results.jsonl (fields that are None are left
    out, so a key is present exactly when it was measured or computed)."""
    # the point and how its run ended
    id: str
    model: str
    zero: int
    act_ckpt: bool
    micro_batch: int
    precision: str                      # asked for
    ranks: int
    nodes: int
    world: int
    status: str = "ok"                  # ok | oom | failed | timeout
    error: str = ""
    wall_s: float = 0.0
    # from the run's folder (measured steps only)
    measured_steps: Optional[int] = None
    precision_effective: Optional[str] = None   # what ran (on CPU fp16/bf16 fall back to fp32)
    global_batch: Optional[int] = None
    step_time_s: Optional[float] = None
    samples_per_sec: Optional[float] = None
    samples_per_sec_per_device: Optional[float] = None
    flops_per_sample: Optional[float] = None
    tflops_per_device: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    peak_mem_base_bytes: Optional[int] = None
    peak_mem_kind: Optional[str] = None         # cuda_max_allocated | cpu_tensor_peak | cpu_max_rss
    loss: Optional[float] = None
    loss_scale: Optional[float] = None
    skipped_steps: Optional[int] = None
    measured_mem_bytes: Optional[int] = None
    # the memory model (see predict)
    pred_model_states_bytes: Optional[int] = None
    pred_activations_bytes: Optional[int] = None
    pred_buffers_bytes: Optional[int] = None
    pred_total_bytes: Optional[int] = None
    num_params: Optional[int] = None
    pred_compare_bytes: Optional[int] = None
    pred_compare_what: Optional[str] = None
    predict_error: Optional[str] = None
    # measurement vs model and device (see score)
    mem_ratio: Optional[float] = None
    mem_within_15pct: Optional[bool] = None
    peak_tflops_per_device: Optional[float] = None
    mfu: Optional[float] = None

    @classmethod
    def of(cls, p: Point, status: str = "ok", error: str = "", wall_s: float = 0.0) -> PointResult:
        return cls(id=p.id, model=p.model, zero=p.zero, act_ckpt=p.act_ckpt, micro_batch=p.micro_batch,
                   precision=p.precision, ranks=p.ranks, nodes=p.nodes, world=p.world, status=status,
                   error=error[-2000:], wall_s=round(wall_s, 1))

    @classmethod
    def from_row(cls, row: dict) -> PointResult:
        """A results.jsonl line back (keys this version does not know are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def to_row(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def update(self, values: dict) -> None:
        for k, v in values.items():
            if not hasattr(self, k):
                raise AttributeError(f"PointResult has no field {k!r}")
            setattr(self, k, v)

    def read_run(self, run_dir: Path, warmup_steps: int) -> None:
        """Throughput, FLOP/s and peak memory from the run's metrics.jsonl and ds_config.json."""
        path = run_dir / "metrics.jsonl"
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
        train = [r for r in records if r.get("kind", "train") == "train"]
        measured = [r for r in train if r["step"] > warmup_steps and r.get("samples_per_sec")]
        self.measured_steps = len(measured)
        ds_path = run_dir / "ds_config.json"
        if ds_path.exists():
            ds = json.loads(ds_path.read_text())
            self.precision_effective = ("fp16" if ds.get("fp16", {}).get("enabled") else
                                        "bf16" if ds.get("bf16", {}).get("enabled") else "fp32")
            self.global_batch = ds.get("train_batch_size")
        if not measured:
            return
        gb = self.global_batch or 0
        if gb:
            # older logs have no step_time_s: one step = global batch / that step's samples_per_sec
            times = [r.get("step_time_s") or gb / r["samples_per_sec"] for r in measured]
            self.step_time_s = sum(times) / len(times)
            self.samples_per_sec = gb / self.step_time_s
            self.samples_per_sec_per_device = self.samples_per_sec / self.world
        last = measured[-1]
        self.flops_per_sample = last.get("flops_per_sample") or (   # older logs: from the logged TFLOP/s
            last["tflops_per_device"] * 1e12 * self.world / last["samples_per_sec"]
            if last.get("tflops_per_device") else None)
        if self.flops_per_sample and self.samples_per_sec:
            self.tflops_per_device = self.flops_per_sample * self.samples_per_sec / self.world / 1e12
        end = train[-1]
        for k in ("peak_mem_bytes", "peak_mem_base_bytes", "peak_mem_kind", "loss"):
            setattr(self, k, end.get(k))
        scales = [r["loss_scale"] for r in train if "loss_scale" in r]
        self.loss_scale = scales[-1] if scales else None
        self.skipped_steps = end.get("skipped_steps", 0)
        if self.peak_mem_kind == "cpu_max_rss":     # the RSS counts what was there before the model
            self.measured_mem_bytes = self.peak_mem_bytes - (self.peak_mem_base_bytes or 0)
        else:
            self.measured_mem_bytes = self.peak_mem_bytes

    def score(self, dev: dict) -> None:
        """Measured / predicted memory, and MFU against the device's peak for the precision run."""
        if self.measured_mem_bytes is not None and self.pred_compare_bytes:
            self.mem_ratio = self.measured_mem_bytes / self.pred_compare_bytes
            self.mem_within_15pct = abs(self.mem_ratio - 1) <= TOLERANCE
        peak = dev.get("peak_tflops", {}).get(self.precision_effective or self.precision)
        if peak and dev["kind"] == "cpu":   # CPU ranks share one machine's cores: each rank's share
            peak /= self.ranks
        if peak and self.tflops_per_device:
            self.peak_tflops_per_device = peak
            self.mfu = self.tflops_per_device / peak


def read_point(p: Point, run_dir: Path, rc: int, wall_s: float, warmup_steps: int) -> PointResult:
    """The result of a run that exited with status ``rc``: measurements, or why there are none."""
    log_path = run_dir / "log.txt"
    if rc != 0:
        text = log_path.read_text(errors="replace")
        return PointResult.of(p, classify_failure(text), f"exit status {rc}: " + error_summary(text), wall_s)
    result = PointResult.of(p, wall_s=wall_s)
    result.read_run(run_dir, warmup_steps)
    if not result.measured_steps:
        result.status = "failed"
        result.error = "the run finished but logged no measured step: " + _tail(log_path)
    return result


def summarize_run(run_dir: Path, warmup_steps: int, world: int) -> dict:
    """The measured fields of a finished run as a dict, for callers without a Point
    (benchmarks/gpu_smoke.py)."""
    result = PointResult.of(Point("", 0, False, 0, "", world))
    result.read_run(run_dir, warmup_steps)
    return {k: v for k, v in result.to_row().items() if k not in IDENTITY}


def classify_failure(log_text: str) -> str:
    """'oom' when any rank ran out of GPU memory (the other ranks then die of broken collectives,
    so the whole log is searched), else 'failed'."""
    lowered = log_text.lower()
    return "oom" if any(s in lowered for s in OOM_PATTERNS) else "failed"


def error_summary(log_text: str, n_tail: int = 8) -> str:
    """The lines that say what went wrong ('error: ...', 'SomethingError: ...', from any rank; the
    launcher's own ChildFailedError report is noise), then the last lines of the log."""
    keys, seen = [], set()
    for ln in log_text.splitlines():
        t = ln.strip()
        if (t.startswith("error:") or re.search(r"\w(Error|Exception): ", t)) and "ChildFailedError" not in t \
                and t not in seen:
            seen.add(t)
            keys.append(t)
    tail = log_text.splitlines()[-n_tail:]
    return "\n".join(keys[:5] + ["--- last lines ---"] + tail)


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def predict(p: Point, precision: str, cfg: StudyConfig, tokenizer: Path, dev: dict) -> dict:
    """The memory model's figure to compare with the measurement of this point: what the
    allocator hands out, ``total - overhead`` (the overhead is the CUDA context and fragmentation
    allowance, invisible to max_memory_allocated and to the CPU tensor probe), with the attention
    path the device runs ('sdpa' on GPU, 'math' on CPU), plus the study's own dVAE weights.
    A dict of PointResult fields."""
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
    tok = _tokenizer_params(tokenizer) * (2 if precision in ("fp16", "bf16") else 4)
    return {"pred_model_states_bytes": est.model_states_bytes, "pred_activations_bytes": est.activations_bytes,
            "pred_buffers_bytes": est.buffers_bytes, "pred_total_bytes": est.total_bytes + tok,
            "num_params": est.num_params,
            "pred_compare_bytes": est.total_bytes - est.overhead_bytes + tok,
            "pred_compare_what": "allocated (total - overhead)"}


def _tokenizer_params(path: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _mfu(row: dict, p: Point, dev: dict) -> None:
    """``PointResult.score`` on a bare result dict (kept for callers that hold one): adds the same keys."""
    result = dataclasses.replace(PointResult.of(p), **row)
    result.score(dev)
    row.update({k: v for k, v in result.to_row().items()
                if k in ("mem_ratio", "mem_within_15pct", "peak_tflops_per_device", "mfu")})
