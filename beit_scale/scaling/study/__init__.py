"""Scaling study: a grid of short, real MIM trainings, measured and set beside the memory model.

Each grid point (model x ZeRO stage x activation checkpointing x micro batch x precision x ranks
[x nodes]) is one run of ``launch/pretrain.py`` in its own process group, for ``warmup_steps +
measure_steps`` steps with ``train.log_every=1``; what it yields (throughput, TFLOP/s and MFU,
peak memory against the memory model) is read from the trainer's metrics.jsonl over the measured
steps. A failed point is a result (``oom``, ``failed``, ``timeout``), not a crash; results are
appended to ``<out>/results.jsonl``, so a re-run skips the points already there.

    config.py    StudyConfig (YAML -> typed, validated), Point, grid_points
    runner.py    per-study setup, one point's command/env/launch/timeout, run_study (resume), main
    analysis.py  PointResult: a finished point's log + metrics.jsonl, predict (memory model), MFU
    report.py    results.csv, plots, report.md

    python launch/scaling_study.py configs/scaling/cpu_smoke.yaml [--out DIR] [--retry-failed]
"""
from beit_scale.scaling.study.analysis import (OOM_PATTERNS, TOLERANCE, PointResult, _mfu, classify_failure,
                                               error_summary, predict, read_point, summarize_run)
from beit_scale.scaling.study.config import REPO, Point, StudyConfig, grid_points, load_study
from beit_scale.scaling.study.report import CSV_COLUMNS, GiB, _report, write_csv, write_outputs
from beit_scale.scaling.study.runner import (DONE_STATUSES, _srun_master_port, device_peak, load_results,
                                             main, make_tokenizer, point_command, run_point, run_study,
                                             srun_cpus_per_task, study_dir)

__all__ = ["StudyConfig", "Point", "PointResult", "load_study", "grid_points", "make_tokenizer", "device_peak",
           "point_command", "srun_cpus_per_task", "study_dir", "run_point", "read_point", "classify_failure",
           "error_summary", "summarize_run", "predict", "run_study", "load_results", "write_outputs",
           "write_csv", "main", "REPO", "GiB", "TOLERANCE", "OOM_PATTERNS", "DONE_STATUSES", "CSV_COLUMNS",
           "_mfu", "_report", "_srun_master_port"]
