"""benchmarks/gpu_smoke.py: arguments, the no-GPU path, and the CPU self-test (the same driver, table,
JSON and resume logic as on a GPU, in fp32 with beit_debug)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_smoke.py"
SELFTEST_ROWS = ["env", "sdpa", "mim_fp32", "resume", "tokenizer", "finetune", "zero3"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2", **extra)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        env.pop(k, None)
    return env


def _run(args, timeout=120, script=None, **env):
    cmd = script or [sys.executable, str(SCRIPT)]
    return subprocess.run([*cmd, *args], cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def test_help():
    r = _run(["--help"])
    assert r.returncode == 0, r.stderr
    for opt in ("--out", "--only", "--steps", "--keep"):
        assert opt in r.stdout
    assert "env, sdpa, mim_fp16, mim_bf16, resume, tokenizer, finetune, zero3" in " ".join(r.stdout.split())
    assert "--cpu-selftest" not in r.stdout       # the test's mode is hidden


@pytest.mark.parametrize("args, msg", [
    (["--only", "nosuchcheck"], "unknown check(s) nosuchcheck"),
    (["--only", "env,nosuchcheck"], "unknown check(s) nosuchcheck"),
    (["--only", ","], "unknown check(s)"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "many"], "invalid int value"),
])
def test_bad_arguments(tmp_path, args, msg):
    r = _run([*args, "--out", str(tmp_path / "s.json")])
    assert r.returncode == 2
    assert msg in r.stderr and "usage:" in r.stderr
    assert not (tmp_path / "s.json").exists()


def test_no_gpu_skips_without_training(tmp_path):
    """CUDA hidden (and there is no GPU here anyway): one message, exit 0, a skipped JSON, no run dirs.
    Through the shell wrapper, which passes the arguments on."""
    out = tmp_path / "smoke.json"
    r = _run(["--out", str(out), "--only", "env,mim,resume"], script=["bash", str(REPO / "benchmarks" / "gpu_smoke.sh")],
             CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no CUDA GPU visible" in r.stdout and "no training started" in r.stdout
    assert "[mim]" not in r.stdout and "DeepSpeed" not in r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["mode"] == "no-gpu" and doc["status"] == "skipped" and "no CUDA GPU" in doc["message"]
    assert [row["name"] for row in doc["rows"]] == ["env", "mim_fp16", "mim_bf16", "resume"]
    assert all(row["status"] == "skip" for row in doc["rows"])
    assert doc["device"]["cuda_available"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke.json"]   # no run dir, no tokenizer


def test_gpus_expected_but_cuda_unusable_fails(tmp_path):
    """CUDA_VISIBLE_DEVICES names a GPU that is not there (as on a GPU machine with a broken driver):
    not a silent skip but a failed env row with torch's reason, exit 1, still no training."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a usable GPU is here: this would start the real smoke test")
    out = tmp_path / "smoke.json"
    r = _run(["--out", str(out)], CUDA_VISIBLE_DEVICES="0")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["status"] == "failed" and [row["name"] for row in doc["rows"]] == ["env"]
    assert doc["rows"][0]["status"] == "FAIL" and "CUDA_VISIBLE_DEVICES=0" in doc["rows"][0]["error"]
    assert "GPUs are expected here" in r.stderr and "[mim]" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke.json"]


def _finite(xs):
    return bool(xs) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_cpu_selftest(tmp_path):
    out = tmp_path / "smoke.json"
    r = _run(["--cpu-selftest", "--out", str(out)], timeout=900)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-6000:]
    doc = json.loads(out.read_text())
    rows = {row["name"]: row for row in doc["rows"]}
    assert [row["name"] for row in doc["rows"]] == SELFTEST_ROWS
    assert doc["mode"] == "cpu-selftest" and doc["status"] == "ok", doc["message"]
    assert {n: row["status"] for n, row in rows.items()} == {n: "ok" for n in SELFTEST_ROWS}
    for row in doc["rows"]:
        assert set(row) >= {"name", "status", "seconds", "summary", "figures", "notes", "error"}
        assert row["seconds"] >= 0 and row["summary"]

    # the table, one line per check
    assert "CPU SELF-TEST" in r.stdout and "check" in r.stdout and "key figures" in r.stdout
    table = r.stdout[r.stdout.rindex("key figures"):]
    for name in SELFTEST_ROWS:
        assert any(ln.split()[:2] == [name, "ok"] for ln in table.splitlines() if ln.strip()), name

    # MIM: finite, falling losses, every step logged, throughput and memory vs the model reported
    mim = rows["mim_fp32"]["figures"]
    s = doc["settings"]
    assert mim["precision"] == "fp32" and mim["model"] == "beit_debug"
    assert len(mim["losses"]) == s["steps"] and _finite(mim["losses"]) and mim["all_finite"]
    assert mim["loss_falling"] and mim["loss_last"] < mim["loss_first"]
    assert mim["skipped_steps"] == 0 and mim["measured_steps"] == s["steps"] - s["warmup"]
    assert mim["samples_per_sec"] > 0 and mim["tflops_per_device"] > 0
    assert mim["mfu"] is None and "MFU n/a" in mim["mfu_note"]                 # CPU: no datasheet peak
    assert mim["measured_mem_bytes"] > 0 and mim["pred_compare_bytes"] > 0 and mim["mem_ratio"] > 0

    # resume: the second run really continued from the first run's checkpoint
    res = rows["resume"]["figures"]
    first, total = s["short"], s["short"] + s["extend"]
    assert res["resumed_at_step"] == first and res["resumed_from"].endswith(f"step_{first:08d}")
    assert res["first_new_step"] == first + 1 and res["last_step"] == total
    assert res["logged_steps"] == list(range(1, total + 1)) and _finite(res["losses"])
    assert "resumed from" in text

    # the other stages
    assert rows["tokenizer"]["figures"]["tokenizer_vocab"] == 512 and rows["tokenizer"]["figures"]["all_finite"]
    ft = rows["finetune"]["figures"]
    assert ft["init_loaded"] > 0 and ft["init_from"].endswith("mim_fp32") and ft["val_top1_ema"] is not None
    assert ft["ema_in_checkpoint"] and ft["all_finite"]
    z3 = rows["zero3"]["figures"]
    assert z3["ds_zero_stage"] == 3 and z3["act_ckpt"] == "all" and z3["all_finite"]
    sd = rows["sdpa"]["figures"]
    for dt in ("fp16", "bf16"):
        assert "math" in sd[dt]["accepting"] and sd[dt]["backends"]["math"]["worst_rel"] < 0.05
    assert sd["mask_effect_rel"] > 0.1

    # run dirs are removed without --keep; the JSON stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke.json"]


def test_cpu_selftest_failing_check_does_not_stop_the_others(tmp_path):
    """An unknown model fails the MIM check (a config error before any process group); the
    tokenizer check (which does not use --model) still runs; exit status 1; --keep keeps run dirs."""
    out = tmp_path / "smoke.json"
    r = _run(["--cpu-selftest", "--only", "mim,tokenizer", "--model", "no_such_model", "--keep",
              "--out", str(out)], timeout=600)
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
    doc = json.loads(out.read_text())
    rows = {row["name"]: row for row in doc["rows"]}
    assert list(rows) == ["mim_fp32", "tokenizer"] and doc["status"] == "failed"
    assert rows["mim_fp32"]["status"] == "FAIL" and "no_such_model" in rows["mim_fp32"]["error"]
    assert "no_such_model" in rows["mim_fp32"]["error_tail"]
    assert rows["tokenizer"]["status"] == "ok"
    assert "FAIL" in r.stdout and "failed: mim_fp32" in r.stdout
    assert (tmp_path / "smoke_runs" / "tokenizer" / "tokenizer.safetensors").exists()
