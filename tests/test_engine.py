"""The DeepSpeed engine across ZeRO stages, gradient accumulation, activation checkpointing and
fp16 loss scaling: real engines, 2 gloo ranks, the real launcher path (tests/drivers/multi_run.py)."""
import json
from pathlib import Path

import pytest

from launching import REPO, losses, read_metrics, run_ranks

DEBUG = ["model.name=beit_debug", "model.drop_path=0.0", "data.num_workers=0", "train.log_every=1",
         "train.eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-3"]


def _spec(tmp: Path, runs: list[dict], fp16: bool = False) -> Path:
    path = tmp / "spec.json"
    path.write_text(json.dumps({"fp16_on_cpu": fp16, "runs": runs}))
    return path


def _run(tmp, runs, fp16=False, nproc=2):
    codes, logs = run_ranks(nproc, ["tests/drivers/multi_run.py", str(_spec(tmp, runs, fp16))], tmp / "logs",
                            timeout=900)
    assert codes == [0] * nproc, logs[-4000:]
    return logs


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tokenizer_file):
    """One 2-rank process group trains: tokenizer and MIM under ZeRO 0-3, MIM with gradient
    accumulation, MIM with activation checkpointing under ZeRO 3."""
    tmp = tmp_path_factory.mktemp("zero")
    tok = [f"tokenizer.checkpoint={tokenizer_file}", "tokenizer.vocab_size=64"]
    runs = []
    for z in range(4):
        runs.append({"stage": "tokenizer", "deepspeed_config": f"ds_configs/zero{z}.json",
                     "run_dir": str(tmp / f"tok_z{z}"),
                     "set": DEBUG + ["tokenizer.vocab_size=64", "tokenizer.hidden_dim=16", "train.max_steps=3",
                                     "train.global_batch=8", "train.micro_batch=4"]})
        runs.append({"stage": "mim", "deepspeed_config": f"ds_configs/zero{z}.json", "run_dir": str(tmp / f"mim_z{z}"),
                     "set": DEBUG + tok + ["train.max_steps=3", "train.global_batch=8", "train.micro_batch=4"]})
    # gradient accumulation: global 16 as 1 x micro 8 x 2 ranks vs 2 x micro 4 x 2 ranks
    for name, micro in (("accum1", 8), ("accum2", 4)):
        runs.append({"stage": "mim", "deepspeed_config": "ds_configs/zero2.json", "run_dir": str(tmp / name),
                     "set": DEBUG + tok + ["train.max_steps=3", "train.global_batch=16", f"train.micro_batch={micro}"]})
    runs.append({"stage": "mim", "deepspeed_config": "ds_configs/zero3.json", "run_dir": str(tmp / "mim_z3_ckpt"),
                 "set": DEBUG + tok + ["train.max_steps=3", "train.global_batch=8", "train.micro_batch=4",
                                       "train.act_ckpt=all"]})
    logs = _run(tmp, runs)
    return tmp, logs


@pytest.mark.parametrize("stage", ["tok", "mim"])
def test_zero_stages_agree(zero_runs, stage):
    tmp, _ = zero_runs
    ref = losses(tmp / f"{stage}_z0")
    assert sorted(ref) == [1, 2, 3]
    for z in (1, 2, 3):
        got = losses(tmp / f"{stage}_z{z}")
        assert sorted(got) == [1, 2, 3]
        for s in ref:
            assert abs(got[s] - ref[s]) < 1e-4, (stage, z, s, got[s], ref[s])
    # the runs really train: the loss moves
    assert ref[1] != ref[3]


def test_run_dir_contents(zero_runs):
    tmp, logs = zero_runs
    run = tmp / "mim_z2"
    assert (run / "config.yaml").exists() and (run / "ds_config.json").exists()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert "cannot run fp16" in logs  # the CPU fallback is announced, not silent
    rows = read_metrics(run)
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_sec", "tflops_per_device", "skipped_steps", "mim_acc"):
        assert key in rows[0], key
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    ev = read_metrics(run, "eval")
    assert ev and "val_mim_acc" in ev[-1] and "val_majority_acc" in ev[-1]
    tok_rows = read_metrics(tmp / "tok_z2")
    for key in ("recon", "kl", "temperature", "perplexity", "codes_used"):
        assert key in tok_rows[0], key


def test_gradient_accumulation_matches(zero_runs):
    tmp, _ = zero_runs
    a, b = losses(tmp / "accum1"), losses(tmp / "accum2")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    ds = json.loads((tmp / "accum2" / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2


def test_activation_checkpointing_under_zero3(zero_runs):
    tmp, logs = zero_runs
    a, b = losses(tmp / "mim_z3"), losses(tmp / "mim_z3_ckpt")
    for s in a:
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    assert "act ckpt blocks [0, 1]" in logs


def test_fp16_loss_scaling_and_injected_overflow(tmp_path, tokenizer_file):
    """DeepSpeed's real fp16 path on CPU (test-only switch); an injected inf skips one step and
    halves the loss scale (hysteresis 1 in this test's DeepSpeed file), and training goes on.
    A second run in the same process group overflows again at min_loss_scale, where DeepSpeed
    raises: the trainer saves, says so, and the launcher exits DIVERGED_EXIT_CODE (4)."""
    from beit_scale.train.checkpoint import COMPLETE
    from beit_scale.train.signals import DIVERGED_EXIT_CODE
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["fp16"].update(hysteresis=1, initial_scale_power=8)
    ds_path = tmp_path / "zero2_fp16_h1.json"
    ds_path.write_text(json.dumps(ds))
    ds["fp16"].update(initial_scale_power=1, min_loss_scale=1)
    ds_min = tmp_path / "zero2_fp16_min.json"
    ds_min.write_text(json.dumps(ds))
    run_dir, div_dir = tmp_path / "fp16", tmp_path / "diverge"
    sets = DEBUG + [f"tokenizer.checkpoint={tokenizer_file}", "tokenizer.vocab_size=64",
                    "train.max_steps=5", "train.global_batch=4", "train.micro_batch=2"]
    codes, logs = run_ranks(2, ["tests/drivers/multi_run.py", str(_spec(tmp_path, [
        {"stage": "mim", "deepspeed_config": str(ds_path), "run_dir": str(run_dir), "overflow_at": [2], "set": sets},
        {"stage": "mim", "deepspeed_config": str(ds_min), "run_dir": str(div_dir), "overflow_at": [2, 3],
         "set": sets}], fp16=True))], tmp_path / "logs", timeout=900)
    assert codes == [DIVERGED_EXIT_CODE] * 2, logs[-4000:]
    div = {r["step"]: r for r in read_metrics(div_dir)}
    assert sorted(div) == [1, 2, 3] and div[2]["loss_scale"] == 2.0 and div[3]["loss_scale"] == 1.0
    assert (div_dir / "checkpoints" / "step_00000003" / COMPLETE).exists()
    assert "overflowed at the minimum loss scale (1.0) during step 4" in logs and "Saved step 3" in logs
    assert "cannot run" not in logs
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    # skipped steps do not advance DeepSpeed's lr scheduler: the lag is logged
    assert rows[2]["sched_lag_steps"] == 0 and rows[3]["sched_lag_steps"] == 1 and rows[5]["sched_lag_steps"] == 1
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "ds_config.json").read_text())["fp16"]["enabled"] is True
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1 and rows[5]["skipped_steps"] == 1
    assert rows[2]["loss_scale"] == 256.0
    assert rows[3]["loss_scale"] == 128.0
    assert all(r["loss"] == r["loss"] for s, r in rows.items() if s != 3)  # finite elsewhere
    assert rows[5]["loss"] < 1e4
