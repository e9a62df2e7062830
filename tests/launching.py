"""Start real multi-rank runs of the project's launch scripts for tests.

`start_ranks` is a minimal torchrun: it spawns N processes with RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set (beit_scale.dist.env reads them, like under torchrun), so a test
sees each rank's exit status and can signal ranks directly.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(nproc: int, argv: list[str], log_dir: Path, extra_env: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO), **(extra_env or {}))
        for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
            env.pop(k, None)
        out = open(log_dir / f"rank{r}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-u", *argv], cwd=REPO, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_all(procs, timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def run_ranks(nproc: int, argv: list[str], log_dir: Path, timeout: float = 600, **kw) -> tuple[list[int], str]:
    codes = wait_all(start_ranks(nproc, argv, log_dir, **kw), timeout)
    return codes, read_logs(log_dir)


def read_logs(log_dir: Path) -> str:
    return "\n".join((log_dir / f).read_text(errors="replace") for f in sorted(os.listdir(log_dir))
                     if f.endswith(".log"))


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("kind", "train") == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def wait_for_step(run_dir: Path, step: int, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a rank exited before step {step}")
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {run_dir} after {timeout}s")
