"""Scaling study: a grid of short real MIM trainings -> results.csv, plots, report.md.

    python launch/scaling_study.py configs/scaling/cpu_smoke.yaml [--out DIR] [--retry-failed] [--report-only]

Re-running the same command skips the points already in <out>/results.jsonl. See docs/scaling_study.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit_scale.scaling.study import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
