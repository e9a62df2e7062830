"""Scaling-study harness: a small real grid on CPU end to end, failures as results, resume."""
import csv
import json
import os

import pytest

from beit_scale.scaling import study


def _rows(out):
    return {r["id"]: r for r in study.load_results(out)}


def test_load_study_rejects_unknown_keys(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("models: beit_debug\nzero: [1]\nmicro_batchs: [2]\n")
    with pytest.raises(ValueError, match="micro_batchs"):
        study.load_study(y)
    y.write_text("models: [beit_small_patch16_224]\nzero: [1]\n")   # a timm-style name the zoo lacks
    with pytest.raises(ValueError, match="unknown model.*beit_small_patch16_224.*zoo models: .*beit_small"):
        study.load_study(y)
    y.write_text("models: beit_debug\nzero: [1, 2]\nact_ckpt: [true, false]\nranks: 2\n")
    cfg = study.load_study(y, out_dir=str(tmp_path / "o"))
    pts = study.grid_points(cfg)
    assert len(pts) == 4 and {p.world for p in pts} == {2}           # a scalar is a 1-value axis
    assert len({p.id for p in pts}) == 4


def test_failure_classification_and_commands(tmp_path):
    assert study.classify_failure("...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate") == "oom"
    assert study.classify_failure("ConfigError: model.name=nope") == "failed"
    log = ("noise\nerror: model.name=nope: unknown model\n" + "x\n" * 30 +
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n  exitcode  : -15\n")
    summary = study.error_summary(log)
    assert summary.startswith("error: model.name=nope") and "ChildFailedError" not in summary.split("---")[0]
    # one rank: plain python; several: torchrun with the global batch of all ranks
    cfg = study.load_study(None, out_dir=str(tmp_path), launcher="local")
    one = study.point_command(cfg, study.Point("beit_debug", 2, True, 4, "fp16", 1), tmp_path, tmp_path / "t")
    two = study.point_command(cfg, study.Point("beit_debug", 3, False, 4, "bf16", 2), tmp_path, tmp_path / "t")
    assert one[2] == "launch/pretrain.py" and "train.act_ckpt=all" in one and "train.global_batch=4" in one
    assert "ds_configs/zero2.json" in one and "precision=fp16" in one
    assert two[2:4] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in two
    assert "train.global_batch=8" in two and "ds_configs/zero3.json" in two and "train.act_ckpt=none" in two


def test_srun_command_passes_cpus_per_task(tmp_path, monkeypatch):
    """srun 22.05+ does not inherit the allocation's --cpus-per-task: each point's srun step passes
    it (study config > SRUN_CPUS_PER_TASK > SLURM_CPUS_PER_TASK), else every rank and its data
    workers get one core."""
    for k in ("SRUN_CPUS_PER_TASK", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(k, raising=False)
    cfg = study.load_study(None, out_dir=str(tmp_path), launcher="srun")
    p = study.Point("beit_debug", 2, False, 4, "fp16", 4, 2)
    head = ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4"]

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "10")          # sbatch --cpus-per-task=10
    cmd = study.point_command(cfg, p, tmp_path, tmp_path / "t")
    assert cmd[:6] == [*head, "--cpus-per-task=10", "--kill-on-bad-exit=1"]
    assert cmd[6:9] == [cmd[6], "-u", "launch/pretrain.py"] and "train.global_batch=32" in cmd

    monkeypatch.setenv("SRUN_CPUS_PER_TASK", "6")            # the user's srun setting wins
    assert study.point_command(cfg, p, tmp_path, tmp_path / "t")[4] == "--cpus-per-task=6"

    y = tmp_path / "s.yaml"                                  # the study config wins over both
    y.write_text("models: beit_debug\ncpus_per_task: 3\n")
    cfg3 = study.load_study(y, out_dir=str(tmp_path), launcher="srun")
    assert study.point_command(cfg3, p, tmp_path, tmp_path / "t")[4] == "--cpus-per-task=3"

    for k in ("SRUN_CPUS_PER_TASK", "SLURM_CPUS_PER_TASK"):  # nothing says: srun's own default
        monkeypatch.delenv(k)
    cmd = study.point_command(cfg, p, tmp_path, tmp_path / "t")
    assert cmd[:5] == [*head, "--kill-on-bad-exit=1"] and not any("cpus-per-task" in a for a in cmd)
    # a local run has no srun and no flag
    local = study.point_command(study.load_study(None, out_dir=str(tmp_path), launcher="local", cpus_per_task=3),
                                p, tmp_path, tmp_path / "t")
    assert not any("cpus-per-task" in a for a in local)

    y.write_text("models: beit_debug\ncpus_per_task: -1\n")
    with pytest.raises(ValueError, match="cpus_per_task"):
        study.load_study(y)


def test_grid_end_to_end_failures_and_resume(tmp_path):
    out = tmp_path / "study"
    # micro batch 0 is an impossible config; it comes first: its failure must not stop the grid.
    cfg = study.load_study(None, models=["beit_debug"], zero=[0], micro_batch=[0, 2, 4],
                           precision=["fp32"], ranks=[1], warmup_steps=2, measure_steps=2,
                           tokenizer_vocab=64, tokenizer_hidden=16, num_workers=0, timeout_s=300,
                           out_dir=str(out))
    rows = study.run_study(cfg, progress=False)
    assert [r["micro_batch"] for r in rows] == [0, 2, 4]
    by = {r["micro_batch"]: r for r in rows}
    assert by[0]["status"] == "failed" and "global_batch=0" in by[0]["error"], by[0]
    for mb in (2, 4):
        ok = by[mb]
        assert ok["status"] == "ok", ok.get("error")
        assert ok["id"] == f"beit_debug-z0-nockpt-mb{mb}-fp32-r1x1"
        assert ok["measured_steps"] == 2 and ok["global_batch"] == mb and ok["world"] == 1
        assert ok["samples_per_sec_per_device"] > 0 and ok["tflops_per_device"] > 0 and ok["mfu"] > 0
        # CPU: the tensor high-water mark of the warm-up steps (torch profiler), not the RSS
        assert ok["peak_mem_kind"] == "cpu_tensor_peak" and ok["peak_mem_base_bytes"] == 0
        # the prediction sits beside the measurement, the ratio is theirs, and the memory model
        # is within the 15 % of what the run allocated
        assert ok["pred_compare_bytes"] > 0
        assert ok["mem_ratio"] == pytest.approx(ok["measured_mem_bytes"] / ok["pred_compare_bytes"])
        assert ok["mem_within_15pct"], (ok["measured_mem_bytes"], ok["pred_compare_bytes"])
        assert not (out / "points" / ok["id"] / "checkpoints").exists()     # study runs keep no checkpoint
        assert "--deepspeed_config" in (out / "points" / ok["id"] / "command.txt").read_text()
    assert by[4]["pred_activations_bytes"] > by[2]["pred_activations_bytes"]

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["failed", "ok", "ok"]
    for png in ("throughput_vs_model.png", "memory_vs_micro_batch.png", "scaling_efficiency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "beit_debug-z0-nockpt-mb2-fp32-r1x1" in report and "predicted" in report
    assert "global_batch=0: must be positive" in report

    # Re-running skips every recorded point: nothing is launched, nothing is appended.
    lines = (out / "results.jsonl").read_text()
    log = out / "points" / "beit_debug-z0-nockpt-mb2-fp32-r1x1" / "log.txt"
    mtime = os.stat(log).st_mtime_ns
    rows2 = study.run_study(cfg, progress=False)
    assert (out / "results.jsonl").read_text() == lines
    assert os.stat(log).st_mtime_ns == mtime
    assert [r["status"] for r in rows2] == [r["status"] for r in rows]
    # retry_failed runs only the failed point again (it fails again and is recorded again)
    study.run_study(cfg, retry_failed=True, progress=False)
    new = (out / "results.jsonl").read_text()[len(lines):].splitlines()
    assert [json.loads(ln)["micro_batch"] for ln in new] == [0]
    assert os.stat(log).st_mtime_ns == mtime


def test_cpu_tensor_high_water_mark():
    """The CPU probe's peak is the most tensor bytes alive at once since start(), frees included."""
    import torch
    from beit_scale.train.mem_probe import CpuTensorHighWater
    probe = CpuTensorHighWater().start()
    a = torch.empty(4 << 20, dtype=torch.uint8)       # 4 MiB
    b = torch.empty(2 << 20, dtype=torch.uint8)       # + 2 MiB -> 6 MiB alive
    del a
    c = torch.empty(3 << 20, dtype=torch.uint8)       # 2 + 3 = 5 MiB alive: not a new peak
    peak = probe.stop()
    assert peak == 6 << 20
    assert probe.final_bytes == 5 << 20
    del b, c


def test_srun_points_get_distinct_ports_below_the_ephemeral_range(monkeypatch):
    from beit_scale.dist.env import SLURM_PORTS
    from beit_scale.scaling import study
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    ports = [study._srun_master_port() for _ in range(3)]
    assert len(set(ports)) == 3 and all(p in SLURM_PORTS and p < 32768 for p in ports)


# ---- PointResult from a synthetic run folder (no training) ------------------------------------
def _fake_run(run_dir, records, precision="bf16", global_batch=8):
    run_dir.mkdir(parents=True)
    (run_dir / "ds_config.json").write_text(json.dumps({"train_batch_size": global_batch,
                                                        precision: {"enabled": True}}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _train_records(new_format=True):
    """4 steps of 8 samples on 2 ranks; steps 1-2 are warm-up. 1e9 FLOPs per sample."""
    out = []
    for step, t in ((1, 9.0), (2, 0.5), (3, 0.4), (4, 0.6)):
        sps = 8 / t
        r = {"kind": "train", "step": step, "loss": 10.0 - step, "samples_per_sec": sps, "skipped_steps": 0,
             "loss_scale": 2.0 ** (16 - step), "peak_mem_bytes": 1000 * step, "peak_mem_base_bytes": 0,
             "peak_mem_kind": "cuda_max_allocated", "tflops_per_device": 1e9 * sps / 2 / 1e12}
        if new_format:
            r.update(step_time_s=t, flops_per_sample=1e9)
        out.append(r)
    out.insert(3, {"kind": "eval", "step": 3, "loss": 1.0})
    return out


@pytest.mark.parametrize("new_format", [True, False], ids=["step_time_logged", "old_log"])
def test_point_result_from_metrics(tmp_path, new_format):
    p = study.Point("beit_debug", 2, False, 4, "bf16", 2)
    _fake_run(tmp_path / "run", _train_records(new_format))
    r = study.read_point(p, tmp_path / "run", 0, 12.34, warmup_steps=2)
    assert isinstance(r, study.PointResult) and (r.status, r.error, r.wall_s) == ("ok", "", 12.3)
    assert (r.id, r.world, r.precision_effective, r.global_batch) == (p.id, 2, "bf16", 8)
    assert r.measured_steps == 2 and isinstance(r.measured_steps, int)
    assert r.step_time_s == pytest.approx(0.5)                      # mean of the measured 0.4 and 0.6
    assert r.samples_per_sec == pytest.approx(16.0) and r.samples_per_sec_per_device == pytest.approx(8.0)
    assert r.flops_per_sample == pytest.approx(1e9)
    assert r.tflops_per_device == pytest.approx(1e9 * 16 / 2 / 1e12)
    assert (r.peak_mem_bytes, r.measured_mem_bytes, r.peak_mem_kind) == (4000, 4000, "cuda_max_allocated")
    assert (r.loss, r.loss_scale, r.skipped_steps) == (6.0, 2.0 ** 12, 0)
    # memory vs the model, MFU vs a GPU's datasheet peak (per device: GPUs are not shared)
    r.update({"pred_compare_bytes": 5000})
    r.score({"kind": "cuda", "peak_tflops": {"bf16": 0.08}})
    assert r.mem_ratio == pytest.approx(0.8) and r.mem_within_15pct is False
    assert r.peak_tflops_per_device == 0.08 and r.mfu == pytest.approx(0.008 / 0.08)
    # CPU: the measured machine peak is shared by the ranks on it
    r.score({"kind": "cpu", "peak_tflops": {"bf16": 0.08}})
    assert r.peak_tflops_per_device == pytest.approx(0.04) and r.mfu == pytest.approx(0.2)
    # results.jsonl round trip; no MFU for a precision the device has no figure for
    row = r.to_row()
    assert study.PointResult.from_row(json.loads(json.dumps(row))) == r and "predict_error" not in row
    bare = study.PointResult.from_row({**row, "mfu": None, "peak_tflops_per_device": None})
    bare.score({"kind": "cuda", "peak_tflops": {"fp16": 1.0}})
    assert bare.mfu is None and "mfu" not in bare.to_row()


def test_point_result_of_failed_runs(tmp_path):
    p = study.Point("beit_debug", 3, True, 64, "fp16", 1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("step 1\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
    r = study.read_point(p, run, 1, 3.0, warmup_steps=2)
    assert r.status == "oom" and r.error.startswith("exit status 1: torch.OutOfMemoryError")
    assert r.measured_steps is None and r.samples_per_sec is None and r.mfu is None
    r.score({"kind": "cuda", "peak_tflops": {"fp16": 100.0}})     # nothing measured: nothing scored
    assert r.mfu is None and r.mem_ratio is None
    assert set(r.to_row()) == {"id", "model", "zero", "act_ckpt", "micro_batch", "precision", "ranks", "nodes",
                               "world", "status", "error", "wall_s"}
    # exit 0 but only warm-up steps logged: failed, with the log's tail
    _fake_run(tmp_path / "short", _train_records()[:2])
    (tmp_path / "short" / "log.txt").write_text("done early\n")
    r = study.read_point(p, tmp_path / "short", 0, 1.0, warmup_steps=2)
    assert r.status == "failed" and "logged no measured step" in r.error and "done early" in r.error
    assert r.measured_steps == 0 and r.precision_effective == "bf16"
