"""Running a study: per-study setup (tokenizer, device peak), one point as its own process group
(command line, environment, local/torchrun/srun, rendezvous ports, timeout), the grid with resume
(results.jsonl is appended after every point; a re-run skips the recorded ones), and the CLI."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from beit_scale.scaling.study.analysis import PointResult, predict, read_point
from beit_scale.scaling.study.config import REPO, Point, StudyConfig, grid_points, load_study
from beit_scale.scaling.study.report import one_line, write_csv, write_outputs

DONE_STATUSES = ("ok", "oom", "failed", "timeout")


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
        save_tokenizer(DVAE(DVAEConfig(vocab_size=vocab, image_size=112, hidden_dim=hidden)), path)  # atomic
    return path


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


# ----------------------------------------------------------------------------------------------
# one point
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


def _point_env(cfg: StudyConfig, p: Point, dev: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dev["kind"] == "cpu":        # ranks share the cores: no oversubscription
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // p.world))
    if _launcher(cfg) == "srun":
        env["MASTER_PORT"] = str(_srun_master_port())
    else:   # a local run inside an allocation must not take the batch step's Slurm view of ranks
        for k in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
                  "SLURM_LOCALID", "SLURM_NODEID"):
            env.pop(k, None)
    return env


def _launch(cmd: list[str], env: dict, log_path: Path, timeout_s: float) -> tuple[Optional[int], float]:
    """Run to the end or to the timeout: (exit status, or None when killed at the timeout; seconds)."""
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)     # the point's own process group only
            proc.wait()
            rc = None
    return rc, time.time() - t0


def run_point(cfg: StudyConfig, p: Point, out_dir: Path, tokenizer: Path, dev: dict) -> PointResult:
    """Run one point to completion and return its result (never raises for a failed run)."""
    run_dir = out_dir / "points" / p.id
    if run_dir.exists():            # a half-finished earlier attempt: start clean
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = point_command(cfg, p, run_dir, tokenizer)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    env = _point_env(cfg, p, dev)
    if _launcher(cfg) == "local" and p.nodes > 1:
        return PointResult.of(p, "failed", f"{p.nodes} nodes need Slurm (launcher srun); this is a local run")
    rc, wall = _launch(cmd, env, run_dir / "log.txt", cfg.timeout_s)
    if rc is None:
        result = PointResult.of(p, "timeout", f"no result after {cfg.timeout_s:.0f} s", wall)
    else:
        result = read_point(p, run_dir, rc, wall, cfg.warmup_steps)
    if not cfg.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result.update(predict(p, result.precision_effective or p.precision, cfg, tokenizer, dev))
    result.score(dev)
    return result


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------
def study_dir(cfg: StudyConfig) -> Path:
    """out_dir, absolute (relative paths are taken from the current directory)."""
    return Path(cfg.out_dir).expanduser().resolve()


def load_results(out_dir: Path) -> list[dict]:
    """The rows of <out_dir>/results.jsonl, the newest attempt of each point."""
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
    """Run every point not yet recorded (with retry_failed: also the failed/timed-out ones), then
    write the outputs. Returns the grid's rows (``PointResult.to_row()``, as in results.jsonl)."""
    out_dir = study_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = grid_points(cfg)
    done = {r["id"]: PointResult.from_row(r) for r in load_results(out_dir)}
    skip_status = ("ok", "oom") if retry_failed else DONE_STATUSES
    todo = [p for p in points if p.id not in done or done[p.id].status not in skip_status]
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
            done[p.id] = result = run_point(cfg, p, out_dir, tokenizer, dev)
            f.write(json.dumps(result.to_row()) + "\n")
            f.flush()
            bar.update(1)
            if progress:
                bar.write(one_line(result))
            write_csv(out_dir, [done[q.id] for q in points if q.id in done])
    bar.close()
    results = [done[p.id] for p in points if p.id in done]
    write_outputs(out_dir, results, dev, cfg)
    return [r.to_row() for r in results]


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
    out_dir = study_dir(cfg)
    if a.report_only:
        rows = load_results(out_dir)
        paths = write_outputs(out_dir, rows, device_peak(out_dir), cfg)
    else:
        rows = run_study(cfg, retry_failed=a.retry_failed)
        paths = {"report": out_dir / "report.md"}
    print(f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} points ok; report: {paths['report']}")
    return 0
