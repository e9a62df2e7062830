"""A study's outputs from its results: results.csv, three plots and report.md (plus the one line
per point the runner prints)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Optional, Union

from beit_scale.io import atomic_path
from beit_scale.scaling.study.analysis import PointResult
from beit_scale.scaling.study.config import StudyConfig

GiB = 2 ** 30
NAN = float("nan")
CSV_COLUMNS = ["id", "status", "model", "num_params", "zero", "act_ckpt", "micro_batch", "precision",
               "precision_effective", "ranks", "nodes", "world", "global_batch", "measured_steps",
               "step_time_s", "samples_per_sec", "samples_per_sec_per_device", "tflops_per_device",
               "peak_tflops_per_device", "mfu", "peak_mem_kind", "peak_mem_bytes", "peak_mem_base_bytes",
               "measured_mem_bytes", "pred_compare_bytes", "pred_compare_what", "mem_ratio",
               "mem_within_15pct", "pred_model_states_bytes", "pred_activations_bytes",
               "pred_buffers_bytes", "pred_total_bytes", "loss", "loss_scale", "skipped_steps", "wall_s",
               "error"]
Rows = Iterable[Union[PointResult, dict]]    # results, or their results.jsonl lines


def _results(rows: Rows) -> list[PointResult]:
    return [r if isinstance(r, PointResult) else PointResult.from_row(r) for r in rows]


def write_outputs(out_dir: Path, rows: Rows, dev: dict, cfg: Optional[StudyConfig] = None) -> dict:
    """results.csv, the plots and report.md; returns their paths by name."""
    out_dir, results = Path(out_dir), _results(rows)
    paths = {"csv": write_csv(out_dir, results)}
    paths.update(_plots(out_dir, results))
    paths["report"] = _report(out_dir, results, dev, cfg, paths)
    return paths


def write_csv(out_dir: Path, rows: Rows) -> Path:
    path = out_dir / "results.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in _results(rows):
            row = r.to_row()
            w.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    return path


def one_line(r: PointResult) -> str:
    """The progress line of a finished point."""
    if r.status != "ok":
        first = (r.error or "").splitlines()[0:1]
        return f"  {r.id}: {r.status.upper()} {first[0] if first else ''}"
    mem = r.measured_mem_bytes
    return (f"  {r.id}: {_or_nan(r.samples_per_sec_per_device):.2f} img/s/device, "
            f"{_or_nan(r.tflops_per_device):.4f} TFLOP/s/device, "
            f"MFU {100 * _or_nan(r.mfu):.1f}%, mem {mem / GiB if mem else NAN:.3f} GiB "
            f"(pred {(r.pred_compare_bytes or 0) / GiB:.3f})")


def _or_nan(v: Optional[float]) -> float:
    return NAN if v is None else v


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _plots(out_dir: Path, rows: list[PointResult]) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r.status == "ok" and r.samples_per_sec_per_device]
    paths = {}

    # 1. throughput vs model size, one line per ZeRO stage (best configuration per model)
    fig, ax = plt.subplots(figsize=(6, 4))
    for z in sorted({r.zero for r in ok}):
        best = {}
        for r in ok:
            if r.zero == z:
                n = r.num_params or 0
                best[n] = max(best.get(n, 0), r.samples_per_sec_per_device)
        xs = sorted(best)
        ax.plot([x / 1e6 for x in xs], [best[x] for x in xs], "o-", label=f"ZeRO {z}")
    ax.set(xlabel="parameters (M)", ylabel="images/s per device", title="Throughput vs model size (best per model)")
    _finish(ax, ok, log_x=True)
    paths["plot_throughput"] = _save(fig, out_dir / "throughput_vs_model.png")

    # 2. memory vs micro batch: measured (solid) and predicted (dashed) per model/ZeRO/ckpt
    fig, ax = plt.subplots(figsize=(6, 4))
    have = [r for r in rows if r.measured_mem_bytes is not None and r.status == "ok"]
    key = lambda r: (r.model, r.zero, r.act_ckpt, r.precision, r.world)   # noqa: E731
    for g in sorted({key(r) for r in have}, key=str):
        pts = sorted((r for r in have if key(r) == g), key=lambda r: r.micro_batch)
        label = f"{g[0]} z{g[1]} {'ckpt' if g[2] else 'no ckpt'} {g[3]} x{g[4]}"
        line, = ax.plot([r.micro_batch for r in pts], [r.measured_mem_bytes / GiB for r in pts], "o-", label=label)
        pred = [(r.micro_batch, r.pred_compare_bytes / GiB) for r in pts if r.pred_compare_bytes]
        if pred:
            ax.plot(*zip(*pred), "x--", color=line.get_color())
    ax.set(xlabel="micro batch per rank", ylabel="GiB per rank",
           title="Peak memory vs micro batch (solid measured, dashed model)")
    _finish(ax, have)
    paths["plot_memory"] = _save(fig, out_dir / "memory_vs_micro_batch.png")

    # 3. scaling efficiency vs ranks: throughput(n) / (n x per-rank throughput at the fewest ranks)
    fig, ax = plt.subplots(figsize=(6, 4))
    eff_rows = []
    key = lambda r: (r.model, r.zero, r.act_ckpt, r.micro_batch, r.precision)   # noqa: E731
    for g in sorted({key(r) for r in ok}, key=str):
        pts = sorted((r for r in ok if key(r) == g), key=lambda r: r.world)
        if len(pts) < 2:
            continue
        base = pts[0].samples_per_sec_per_device
        eff_rows.append(pts)
        ax.plot([r.world for r in pts], [r.samples_per_sec_per_device / base for r in pts], "o-",
                label=f"{g[0]} z{g[1]} mb{g[3]}")
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


# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------
def _fmt(v, spec=".3g", scale=1.0, empty="-"):
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return empty
    return format(v / scale, spec)


def _report(out_dir: Path, rows: list[PointResult], dev: dict, cfg: Optional[StudyConfig], paths: dict) -> Path:
    ok = [r for r in rows if r.status == "ok"]
    bad = [r for r in rows if r.status != "ok"]
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
        f"{sum(r.status == s for r in rows)} {s}" for s in ("oom", "failed", "timeout")) + ".")
    L += ["", "Throughput = global batch / mean measured step time; TFLOP/s = counted FLOPs per sample x "
          "throughput / ranks; MFU = that / the device's dense peak"
          + (" (on CPU: the machine's measured matmul rate / ranks on it, since ranks share the cores)." if cpu else "."),
          ""]
    L += ["| point | img/s/dev | step s | TFLOP/s/dev | MFU | measured GiB | predicted GiB | ratio | within 15% |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        L.append(f"| {r.id} | {_fmt(r.samples_per_sec_per_device, '.2f')} | "
                 f"{_fmt(r.step_time_s, '.3f')} | {_fmt(r.tflops_per_device, '.4f')} | "
                 f"{_fmt(r.mfu, '.1%')} | {_fmt(r.measured_mem_bytes, '.3f', GiB)} | "
                 f"{_fmt(r.pred_compare_bytes, '.3f', GiB)} | {_fmt(r.mem_ratio, '.2f')} | "
                 f"{'yes' if r.mem_within_15pct else 'no' if r.mem_ratio is not None else '-'} |")
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
    both = [r for r in ok if r.mem_ratio is not None]
    if both:
        n_in = sum(bool(r.mem_within_15pct) for r in both)
        L += [f"Within 15 %: {n_in} of {len(both)} points.", ""]
    if bad:
        L += ["## Points that did not finish", ""]
        for r in bad:
            tail = (r.error or "").strip().split("--- last lines ---")[0].splitlines()[:3]
            L.append(f"- **{r.id}**: {r.status}" + (": `" + " / ".join(t.strip() for t in tail)[-300:] + "`"
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
