"""The project's own sbatch scripts against a REAL local Slurm (two virtual nodes, one host).

The cluster comes from tests/slurm_cluster.py (installed with apt-get when missing; the tests
skip only when Slurm cannot be installed at all). Jobs run on CPU: the GPU lines of the
scripts are overridden on the sbatch command line (--gres=none, one task per node).

Entry points: launch/pretrain.py (the real pretraining, debug model) once it runs here, and
tests/slurm_payload.py (a tiny gloo program with the trainer's CLI and its preemption
protocol), which also checks rank placement and stands in for the real one in the (slow)
preemption test while launch/pretrain.py is not ready.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import LocalSlurmCluster, SlurmUnavailable, cleanup_stale, ensure_installed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = "tests/slurm_payload.py"
PRETRAIN = "launch/pretrain.py"
PRETRAIN_CONFIG = "configs/pretrain/base.yaml"  # the sbatch script's default (unused by the payload)
SBATCH_SCRIPT = "launch/slurm/pretrain_base.sbatch"
# CPU overrides of the V100 script: 2 nodes x 1 rank, no GPUs; a 10-minute limit with the
# automatic USR1 at 5 s before it, so it never fires during a test (it may come ~60 s early).
CPU_FLAGS = ["--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1",
             "--time=10", "--signal=B:USR1@5"]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="local Slurm cluster needs Linux")


@pytest.fixture(scope="session")
def slurm():
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(f"Slurm unavailable: {e}")
    cleanup_stale()
    cluster = LocalSlurmCluster().start()
    yield cluster
    cluster.stop()


_pretrain_ready: tuple[bool, str] | None = None


def pretrain_ready() -> tuple[bool, str]:
    """Is the real entry point there and able to parse its CLI? (checked once)"""
    global _pretrain_ready
    if _pretrain_ready is None:
        if not (ROOT / PRETRAIN).exists():
            _pretrain_ready = (False, f"{PRETRAIN} does not exist yet")
        else:
            r = subprocess.run([sys.executable, PRETRAIN, "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
            ok = r.returncode == 0 and "--run_dir" in r.stdout and "--set" in r.stdout
            _pretrain_ready = (ok, "" if ok else
                               f"{PRETRAIN} --help failed or lacks --run_dir/--set: {r.stderr[-500:]}")
    return _pretrain_ready


def entry_args(entry: str, tmp_path: Path, max_steps: int, extra: list[str] = (),
               tokenizer: Path | None = None) -> tuple[str, list[str]]:
    """(CONFIG, --set list) for an entry point, CPU-sized."""
    sets = [f"train.max_steps={max_steps}", "train.global_batch=4", "train.micro_batch=2", *extra]
    if entry == PRETRAIN:
        # The experiment YAML goes through CONFIG like a user's would: debug model, a log line
        # per step, no eval, no periodic checkpoints (only the one the preemption asks for),
        # and a ready tokenizer so no tokenizer stage runs first. Precision stays a --set
        # (it must agree with the DeepSpeed JSON, which is fp16: V100).
        config = tmp_path / "experiment.yaml"
        config.write_text(
            "model: {name: beit_debug}\n"
            f"tokenizer: {{checkpoint: {tokenizer}, vocab_size: {TOKENIZER_VOCAB}}}\n"
            "train: {log_every: 1, eval_batches: 0}\n"
            "checkpoint: {every_steps: 0}\n")
        return str(config), ["precision=fp32", *sets]
    return PRETRAIN_CONFIG, ["payload.step_seconds=0.4", *sets]


TOKENIZER_VOCAB = 256


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """An untrained tokenizer file: the MIM stage needs one, its quality is irrelevant here."""
    code = ("import sys, torch; from beit_scale.models.dvae import DVAE, DVAEConfig, save_tokenizer\n"
            "torch.manual_seed(0)\n"
            f"save_tokenizer(DVAE(DVAEConfig(vocab_size={TOKENIZER_VOCAB}, image_size=112, hidden_dim=16)), sys.argv[1])")
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.safetensors"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=True, timeout=120)
    return path


@pytest.fixture
def tokenizer(request, entry):
    return request.getfixturevalue("tokenizer_file") if entry == PRETRAIN else None


def submit(slurm: LocalSlurmCluster, tmp_path: Path, entry: str, max_steps: int, *,
           extra_sets: list[str] = (), max_restarts: int = 3,
           tokenizer: Path | None = None) -> tuple[str, Path, Path]:
    """Submit the project's sbatch script with CPU overrides: (job id, run dir, job log)."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    config, sets = entry_args(entry, tmp_path, max_steps, list(extra_sets), tokenizer)
    env = dict(slurm.env, ENTRY=entry, CONFIG=config, RUN_DIR=str(run_dir), PYTHON=sys.executable,
               BEIT_ROOT=str(ROOT), MAX_RESTARTS=str(max_restarts),
               EXTRA=" ".join(f"--set {s}" for s in sets))
    cmd = ["sbatch", "--parsable", f"--output={log}", *CPU_FLAGS, SBATCH_SCRIPT]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    return r.stdout.strip().split(";")[0], run_dir, log


def wait_done(slurm, job: str, log: Path, timeout: float = 180) -> tuple[str, int]:
    try:
        return slurm.wait_job(job, timeout)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{describe(slurm, log)}")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind", "train") == "train"]  # the trainer also logs evals


def entries(payload_only_as_fallback: bool = False):
    """The payload always (cheap, and it reports rank placement), plus the real pretraining once
    it runs; payload_only_as_fallback: the payload only while the real one is not ready."""
    ready, why = pretrain_ready()
    real = pytest.param(PRETRAIN, marks=pytest.mark.skipif(not ready, reason=why))
    if payload_only_as_fallback and ready:
        return [real]
    return [PAYLOAD, real]


def describe(slurm, log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no job log)"
    return f"--- job log ---\n{text[-4000:]}\n--- cluster logs ---\n{slurm.logs(15)}"


@pytest.mark.parametrize("entry", entries())
def test_two_node_job_forms_one_world_and_finishes(slurm, tmp_path, entry, tokenizer):
    steps = 4
    job, run_dir, log = submit(slurm, tmp_path, entry, steps, tokenizer=tokenizer)
    state, code = wait_done(slurm, job, log)
    assert (state, code) == ("COMPLETED", 0), describe(slurm, log)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), describe(slurm, log)
    text = log.read_text()
    assert f"2 tasks on 2 node(s) [{','.join(sorted(slurm.nodes))}]" in text  # run.sh's header
    assert "(CPUs per task: 1)" in text          # sbatch --cpus-per-task reached srun explicitly
    if entry == PRETRAIN:  # the trainer reports the world it joined
        assert "| 2 rank(s) on cpu |" in text, describe(slurm, log)
    else:  # srun --label: every rank's own line is in the one log
        assert "0: [dist] launcher=slurm rank=0/2" in text and "1: [dist] launcher=slurm rank=1/2" in text
        ranks = [json.loads((run_dir / "world" / f"rank{i}.json").read_text()) for i in range(2)]
        assert {w["slurm_node"] for w in ranks} == set(slurm.nodes)  # one rank on each node
        assert all(w["world_size"] == 2 and w["allreduce_sum"] == 3.0 for w in ranks)
        assert ranks[0]["master_addr"] == ranks[1]["master_addr"] == sorted(slurm.nodes)[0]


@pytest.mark.parametrize("entry", entries(payload_only_as_fallback=True))
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path, entry, tokenizer):
    steps = 12 if entry == PAYLOAD else 20
    job, run_dir, log = submit(slurm, tmp_path, entry, steps, tokenizer=tokenizer)
    # preempt once a few steps are done, as `#SBATCH --signal=B:USR1@...` would
    deadline = time.time() + 150
    while len(read_metrics(run_dir)) < 3:
        assert time.time() < deadline, f"job made no progress\n{describe(slurm, log)}"
        assert slurm.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), describe(slurm, log)
        time.sleep(0.3)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    assert wait_done(slurm, job, log) == ("COMPLETED", 0), describe(slurm, log)
    assert slurm.job_field(job, "Restarts") == "1", describe(slurm, log)

    metrics = read_metrics(run_dir)
    got = [m["step"] for m in metrics]
    assert got == list(range(1, steps + 1)), f"steps trained: {got}\n{describe(slurm, log)}"
    text = log.read_text()
    assert "received SIGUSR1" in text and "requeueing job" in text
    assert "restart 0/3" in text and "restart 1/3" in text  # both runs appended to one log
    assert "exited with status 3" in text and "exited with status 0" in text
    # the rerun starts right after the step the preempted run saved: nothing trained twice
    saved = re.findall(r"^0: .*saved step (\d+)", text, re.M)
    resumed = re.findall(r"^0: resumed from .* at step (\d+)", text, re.M)
    assert len(saved) == 1 and resumed == saved, f"saved {saved}, resumed {resumed}\n{describe(slurm, log)}"
    if entry == PAYLOAD:
        stopped = [m["step"] for m in metrics if m["restart"] == 0][-1]
        assert stopped < steps and metrics[stopped]["restart"] == 1  # the rerun took over


@pytest.mark.parametrize("entry", entries())
def test_indivisible_global_batch_fails_fast_with_clear_message(slurm, tmp_path, entry, tokenizer):
    # global batch 6 cannot be split into micro batch 2 x world size 2
    t0 = time.time()
    job, run_dir, log = submit(slurm, tmp_path, entry, 4, extra_sets=["train.global_batch=6"],
                               tokenizer=tokenizer)
    state, code = wait_done(slurm, job, log, timeout=90)  # bounded: a hang fails the test
    assert state == "FAILED" and code != 0, describe(slurm, log)
    text = log.read_text()
    errors = [line for line in text.splitlines() if "global batch 6" in line.lower()
              or "global_batch" in line and "6" in line]
    assert errors, f"no clear message about the global batch\n{describe(slurm, log)}"
    assert any(line.startswith("0:") for line in errors), f"rank 0 should print the message\n{text}"
    assert "requeueing" not in text  # a config error is not a preemption
    assert slurm.job_field(job, "Restarts") == "0"
    assert time.time() - t0 < 90


def test_scancel_stops_for_good(slurm, tmp_path):
    """SIGTERM (scancel, time limit) lets the ranks save but must never requeue the job."""
    job, run_dir, log = submit(slurm, tmp_path, PAYLOAD, 40)
    deadline = time.time() + 90
    while len(read_metrics(run_dir)) < 2:
        assert time.time() < deadline, f"job made no progress\n{describe(slurm, log)}"
        time.sleep(0.3)
    slurm.run("scancel", job)
    deadline = time.time() + 30
    while "not requeueing after SIGTERM" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, f"run.sh did not report the SIGTERM\n{describe(slurm, log)}"
        time.sleep(0.3)
    time.sleep(1)
    assert slurm.job_state(job) == "CANCELLED" and slurm.job_field(job, "Restarts") == "0"
    assert "requeueing job" not in log.read_text()
    assert (run_dir / "ckpt.json").exists()  # the ranks still saved on the way out


def test_restart_bound_is_respected(slurm, tmp_path):
    """With MAX_RESTARTS=0 a preempted job checkpoints and stops (status 3) instead of requeueing."""
    job, run_dir, log = submit(slurm, tmp_path, PAYLOAD, 40, max_restarts=0)
    deadline = time.time() + 90
    while len(read_metrics(run_dir)) < 2:
        assert time.time() < deadline, f"job made no progress\n{describe(slurm, log)}"
        time.sleep(0.3)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    state, code = wait_done(slurm, job, log, timeout=60)
    text = log.read_text()
    assert (state, code) == ("FAILED", 3), describe(slurm, log)
    assert "reached MAX_RESTARTS=0" in text and "requeueing job" not in text
    assert json.loads((run_dir / "ckpt.json").read_text())["step"] == read_metrics(run_dir)[-1]["step"]


def test_run_sh_refuses_outside_an_allocation():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", "launch/slurm/run.sh", PAYLOAD], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "inside a Slurm allocation" in r.stderr


def _fake_srun_run_sh(tmp_path: Path, **env_vars) -> str:
    """run.sh's srun command line, with a stand-in srun on PATH that prints its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text('#!/bin/bash\necho "SRUN $*"\n')
    (fake / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="n1", PYTHON="python3", **env_vars)
    r = subprocess.run(["bash", "launch/slurm/run.sh", PAYLOAD, "--x", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return next(line for line in r.stdout.splitlines() if line.startswith("SRUN "))


def test_run_sh_passes_cpus_per_task_to_srun(tmp_path):
    """srun 22.05+ does not inherit sbatch's --cpus-per-task: run.sh passes it explicitly."""
    assert "--kill-on-bad-exit=1 --cpus-per-task=10 python3 -u" in _fake_srun_run_sh(tmp_path, SLURM_CPUS_PER_TASK="10")
    assert "--cpus-per-task=4 python3" in _fake_srun_run_sh(tmp_path, SLURM_CPUS_PER_TASK="10", SRUN_CPUS_PER_TASK="4")
    assert "cpus-per-task" not in _fake_srun_run_sh(tmp_path)        # nothing set: srun's own default
    # SRUN_ARGS come last, so a --cpus-per-task there wins
    assert _fake_srun_run_sh(tmp_path, SLURM_CPUS_PER_TASK="10", SRUN_ARGS="--cpus-per-task=2").endswith(
        f"--cpus-per-task=10 --cpus-per-task=2 python3 -u {PAYLOAD} --x 1")


def test_every_sbatch_script_asks_for_cpus_per_task():
    for script in sorted((ROOT / "launch/slurm").glob("*.sbatch")):
        text = script.read_text()
        assert re.search(r"^#SBATCH --cpus-per-task=\d+", text, re.M), script.name
        assert "MASTER_PORT" not in text, script.name   # the port is derived in Python (dist/env.py)
        # the GPU scripts launch through run.sh (which passes --cpus-per-task on to srun), the
        # scaling study through its own srun steps (which pass it too)
        assert "launch/slurm/run.sh" in text or "launch/scaling_study.py" in text, script.name


def test_scaling_study_sbatch_runs_a_grid_across_node_counts(slurm, tmp_path, tokenizer_file):
    """launch/slurm/scaling_study.sbatch: one allocation of 2 nodes; the study runs each point
    as an srun step, on 1 node and on 2, and both finish with measurements."""
    out = tmp_path / "study"
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: [beit_debug]\nzero: [2]\nact_ckpt: [false]\nmicro_batch: [2]\n"
                    "precision: [fp32]\nranks: [1]\nnodes: [1, 2]\nwarmup_steps: 2\nmeasure_steps: 1\n"
                    "tokenizer_vocab: 64\ntokenizer_hidden: 16\nnum_workers: 0\ntimeout_s: 240\n"
                    f"out_dir: {out}\n")
    log = tmp_path / "job.log"
    env = dict(slurm.env, PYTHON=sys.executable, BEIT_ROOT=str(ROOT))
    cmd = ["sbatch", "--parsable", f"--output={log}", *CPU_FLAGS, "launch/slurm/scaling_study.sbatch", str(grid)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    job = r.stdout.strip().split(";")[0]
    state, code = wait_done(slurm, job, log, timeout=400)
    assert (state, code) == ("COMPLETED", 0), describe(slurm, log)
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines() if ln.strip()]
    assert [(r["nodes"], r["world"], r["status"]) for r in rows] == [(1, 1, "ok"), (2, 2, "ok")], \
        [r.get("error") for r in rows]
    for r in rows:
        assert r["samples_per_sec_per_device"] > 0 and r["measured_steps"] == 1
        cmd_line = (out / "points" / r["id"] / "command.txt").read_text()
        assert cmd_line.startswith(f"srun --nodes={r['nodes']} --ntasks={r['world']}"), cmd_line
        assert " --cpus-per-task=1 " in cmd_line, cmd_line   # from the allocation's SLURM_CPUS_PER_TASK
        assert f"| {r['world']} rank(s) on cpu |" in (out / "points" / r["id"] / "log.txt").read_text()
    assert (out / "scaling_efficiency.png").exists() and "r1x2" in (out / "report.md").read_text()


def test_guard_exit_status_is_not_requeued(slurm, tmp_path):
    """The divergence guard gives up with GUARD_EXIT_CODE (5) after its bound (tests/test_guard.py
    checks the trainer side): the sbatch wrapper must not requeue it, as it would a status 3."""
    from beit_scale.train.guard import GUARD_EXIT_CODE
    entry = tmp_path / "gives_up.py"
    entry.write_text(f"import sys\nprint('guard: giving up', flush=True)\nsys.exit({GUARD_EXIT_CODE})\n")
    job, run_dir, log = submit(slurm, tmp_path, str(entry), 4)
    state, code = wait_done(slurm, job, log, timeout=60)
    text = log.read_text()
    assert (state, code) == ("FAILED", GUARD_EXIT_CODE), describe(slurm, log)
    assert "not requeueing: training diverged (status 5" in text and "requeueing job" not in text
    assert slurm.job_field(job, "Restarts") == "0"
