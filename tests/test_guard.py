"""The divergence guard (beit_scale/train/guard.py, issue 13).

Detector unit tests (pure Python, no process group), then one 2-rank launch through the real
launcher path (tests/drivers/multi_run.py) that checks the rollback end to end.
"""
import math
import random

import pytest
import torch

from beit_scale.train.guard import (GRAD_SPIKE, LOSS_SPIKE, MIN_LOSS_SCALE, NONFINITE_GRAD, NONFINITE_LOSS,
                                    SKIP_STORM, Detector, DetectorCfg, Fault, inject, parse_faults)


def noisy_curve(n: int, seed: int = 0, noise: float = 0.15) -> list[float]:
    """A pretraining-like loss: fast early drop, slow decay, per-batch noise (small batches are
    noisy), and a slow bump (a plateau that rises a little) that must not count as a spike."""
    rng = random.Random(seed)
    out = []
    for s in range(1, n + 1):
        base = 3.0 + 6.0 * math.exp(-s / 60) + 0.3 * math.exp(-((s - 400) / 40) ** 2)
        out.append(base * math.exp(rng.gauss(0, noise)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_no_false_positive_on_a_noisy_run(seed):
    """Default thresholds over 800 steps of a noisy, decaying loss (with grad norms that wander
    by 2x): no event."""
    det = Detector(DetectorCfg(grad_spike_factor=10.0))
    rng = random.Random(seed + 100)
    for step, loss in enumerate(noisy_curve(800, seed), start=1):
        gn = 1.0 + math.sin(step / 50) * 0.5 + rng.uniform(0, 0.5)
        assert det.observe(step, loss, gn) is None, (seed, step, loss)


def test_no_false_positive_on_a_recorded_debug_run():
    """The loss and grad norm of every step of a real 400-step beit_debug MIM run (global batch 4:
    noisy), recorded in tests/data: the default thresholds raise nothing (the worst 5-step mean
    of the loss was 1.04x its running median), nor the grad-norm check at 3x (worst 1.5x).  A
    loss that triples is caught within 3 steps."""
    import json
    from pathlib import Path
    rec = json.loads((Path(__file__).parent / "data" / "guard_beit_debug_400steps.json").read_text())
    assert len(rec["loss"]) == 400
    det = Detector(DetectorCfg(grad_spike_factor=3.0))
    for step, (loss, gn) in enumerate(zip(rec["loss"], rec["grad_norm"]), start=1):
        assert det.observe(step, loss, gn) is None, (step, loss, gn)
    det = Detector(DetectorCfg())
    for step, loss in enumerate(rec["loss"][:300], start=1):
        assert det.observe(step, loss) is None
    # the loss tripled from step 301 on: the mean of the last 5 passes 2x the median once 3 of
    # them are tripled ((3 * 3 + 2) / 5 = 2.2)
    assert [det.observe(s, rec["loss"][s - 1] * 3) for s in (301, 302, 303)] == [None, None, LOSS_SPIKE]


def test_loss_spike_detected_and_warmup_exempt():
    cfg = DetectorCfg(warmup_steps=10, loss_window=20, spike_steps=3, spike_factor=2.0)
    det = Detector(cfg)
    losses = noisy_curve(60, noise=0.05)
    # a 50x loss during warm-up is exempt
    assert det.observe(5, losses[4] * 50) is None
    for s in range(6, 41):
        assert det.observe(s, losses[s - 1]) is None
    # one step at 10x the loss lifts the mean of the last 3 above 2x the median: caught at once
    assert det.observe(41, losses[40] * 10) == LOSS_SPIKE


def test_spike_needs_a_reference_and_truncate_forgets_rolled_back_steps():
    cfg = DetectorCfg(warmup_steps=0, loss_window=10, spike_steps=2, spike_factor=2.0)
    det = Detector(cfg)
    assert det.observe(1, 5.0) is None and det.observe(2, 5.0) is None
    assert det.observe(3, 100.0) is None   # reference too short (< half a window): no verdict yet
    det.truncate(0)
    for s in range(1, 11):
        assert det.observe(s, 5.0) is None
    assert det.observe(11, 50.0) == LOSS_SPIKE
    det.truncate(8)  # rolled back to step 8: steps 9-11 are trained again
    assert [s for s, _ in det.losses] == list(range(1, 9))
    assert det.observe(9, 5.0) is None


def test_nonfinite_loss_and_grad():
    det = Detector(DetectorCfg())
    assert det.observe(1, float("nan")) == NONFINITE_LOSS
    assert det.observe(2, float("inf"), 1.0) == NONFINITE_LOSS
    assert det.observe(3, 1.0, float("nan")) == NONFINITE_GRAD
    # bf16/fp32: a step DeepSpeed skipped had non-finite gradients (ZeRO 1/2 skip them)
    assert det.observe(4, 1.0, 1.0, skipped=True) == NONFINITE_GRAD
    assert det.observe(5, 1.0, 1.0) is None


def test_fp16_skips_storm_and_min_scale():
    cfg = DetectorCfg(warmup_steps=2, skip_window=10, max_skips=2)
    det = Detector(cfg, fp16=True, min_loss_scale=1.0)
    # skipped fp16 steps (inf grad norm) are DeepSpeed's normal overflow handling, not NaN;
    # those in warm-up (the initial loss-scale search) do not count
    for s in (1, 2):
        assert det.observe(s, 5.0, float("inf"), skipped=True, loss_scale=2.0 ** 16) is None
    assert det.observe(3, 5.0, float("inf"), skipped=True, loss_scale=1024.0) is None
    assert det.observe(8, 5.0, float("inf"), skipped=True, loss_scale=512.0) is None
    assert det.observe(14, 5.0, float("inf"), skipped=True, loss_scale=256.0) is None  # step 3 left the window
    assert det.observe(16, 5.0, float("inf"), skipped=True, loss_scale=128.0) == SKIP_STORM  # 8, 14, 16 > 2
    det2 = Detector(cfg, fp16=True, min_loss_scale=1.0)
    assert det2.observe(1, 5.0, 1.0, loss_scale=2.0) is None
    assert det2.observe(2, 5.0, 1.0, loss_scale=1.0) == MIN_LOSS_SCALE  # never exempt
    # an fp16 forward that overflows (inf loss) is skipped by DeepSpeed too: a skip, not a NaN verdict
    det3 = Detector(DetectorCfg(warmup_steps=0, skip_window=10, max_skips=1), fp16=True, min_loss_scale=1.0)
    assert det3.observe(1, float("inf"), float("inf"), skipped=True, loss_scale=8.0) is None
    assert det3.observe(2, float("nan"), float("inf"), skipped=True, loss_scale=4.0) == SKIP_STORM


def test_grad_spike_optional():
    cfg = DetectorCfg(warmup_steps=0, loss_window=10, spike_steps=1, spike_factor=2.0)
    off, on = Detector(cfg), Detector(DetectorCfg(**{**cfg.__dict__, "grad_spike_factor": 5.0}))
    for s in range(1, 11):
        assert off.observe(s, 5.0, 1.0) is None and on.observe(s, 5.0, 1.0) is None
    assert off.observe(11, 5.0, 50.0) is None
    assert on.observe(11, 5.0, 50.0) == GRAD_SPIKE


def test_detector_state_round_trip():
    cfg = DetectorCfg(warmup_steps=0, loss_window=10, spike_steps=2, skip_window=10, max_skips=1)
    a = Detector(cfg, fp16=True)
    for s in range(1, 12):
        a.observe(s, 5.0, 1.0, skipped=s == 11)
    b = Detector(cfg, fp16=True)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    # the resumed detector decides as the original would: a second skip in the window is a storm
    assert b.observe(12, 5.0, None, skipped=True) == a.observe(12, 5.0, None, skipped=True) == SKIP_STORM


def test_parse_faults_and_inject():
    assert parse_faults(None) == [] and parse_faults("") == []
    assert parse_faults("nan@7/1, grad@9,spike@12x50") == [
        Fault("nan", 7, 1), Fault("grad", 9, 0), Fault("spike", 12, 0, 50.0)]
    for bad in ("nan@0", "boom@3", "nan7", "nan@3x2", "spike@x"):
        with pytest.raises(ValueError, match="KIND@STEP"):
            parse_faults(bad)
    w = torch.ones(3, requires_grad=True)
    loss = (w * 2).sum()
    assert torch.isnan(inject(loss, Fault("nan", 1)))
    assert inject(loss, Fault("spike", 1, factor=4.0)).item() == 24.0
    out = inject(loss, Fault("grad", 1))
    assert out.item() == 6.0   # the loss stays finite ...
    out.backward()
    assert torch.isinf(w.grad).all()   # ... its gradient does not (an fp16 overflow)


def test_config_section_defaults_on_and_bounds():
    from beit_scale.config import ConfigError, from_dict
    cfg = from_dict({"guard": {"inject": "nan@3/1"}})
    assert cfg.guard.enabled and cfg.guard.inject == "nan@3/1" and cfg.guard.grad_spike_factor is None
    with pytest.raises(ConfigError, match="guard.spike_factor"):
        from_dict({"guard": {"spike_factor": 0.5}})
    with pytest.raises(ConfigError, match="guard.no_such_key"):
        from_dict({"guard": {"no_such_key": 1}})


def test_retention_keeps_a_rollback_target(tmp_path):
    """keep_last=2 alone would keep steps 8 and 10; with the guard's window of 5 steps the newest
    checkpoint at least 5 steps older than the newest (step 4) stays too."""
    from beit_scale.config import CheckpointCfg
    from beit_scale.train.checkpoint import CheckpointManager
    from beit_scale.train.checkpoint.layout import COMPLETE

    def kept(protect):
        run = tmp_path / f"p{protect}"
        for s in range(2, 12, 2):
            d = run / "checkpoints" / f"step_{s:08d}"
            d.mkdir(parents=True)
            (d / COMPLETE).write_text(f"{s}\n")
        m = CheckpointManager(run, CheckpointCfg(keep_last=2), {})
        m.protect_steps = protect
        m._retain()
        return sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir())
    assert kept(0) == [8, 10]
    assert kept(5) == [4, 8, 10]
    assert kept(2) == [8, 10]   # step 8 is old enough already


# ----------------------------------------------------------------------------- launched runs

def _spec(tmp, runs, fp16=False):
    import json
    path = tmp / "spec.json"
    path.write_text(json.dumps({"fp16_on_cpu": fp16, "runs": runs}))
    return path


DEBUG = ["model.name=beit_debug", "model.drop_path=0.0", "data.num_workers=0", "train.log_every=1",
         "train.eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-3", "train.global_batch=4",
         "train.micro_batch=2", "checkpoint.every_steps=2"]
# thresholds a few debug steps can reach (the defaults wait 200 steps and look at 100)
QUICK = ["guard.warmup_steps=0", "guard.suspect_steps=1", "guard.loss_window=4", "guard.spike_steps=1"]
GB = 4


@pytest.fixture(scope="module")
def guard_runs(tmp_path_factory, tokenizer_file):
    """One 2-rank process group (the CPU fp16 switch on; fp32 runs say so): guard off (reference),
    a NaN on rank 1, a loss spike on rank 0, an fp16 skip storm then the minimum loss scale, and
    last (it ends the process group with its exit status) the NaN run resumed as after a
    preemption, with one rollback allowed and another NaN: past the bound."""
    import json

    from launching import REPO, run_ranks
    tmp = tmp_path_factory.mktemp("guard")
    tok = [f"tokenizer.checkpoint={tokenizer_file}", "tokenizer.vocab_size=64"]
    fp32 = DEBUG + tok + ["precision=fp32"]
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["fp16"].update(hysteresis=1, initial_scale_power=4, min_loss_scale=1)
    (tmp / "fp16.json").write_text(json.dumps(ds))
    zero2 = "ds_configs/zero2.json"
    runs = [
        {"stage": "mim", "deepspeed_config": zero2, "run_dir": str(tmp / "off"),
         "set": fp32 + ["train.max_steps=6", "guard.enabled=false"]},
        {"stage": "mim", "deepspeed_config": zero2, "run_dir": str(tmp / "nan"),
         "set": fp32 + QUICK + ["train.max_steps=6", "guard.inject=nan@5/1", "guard.suspect_steps=2"]},
        {"stage": "mim", "deepspeed_config": zero2, "run_dir": str(tmp / "spike"),
         "set": fp32 + QUICK + ["train.max_steps=6", "guard.inject=spike@5x100", "guard.lr_factor=0.5",
                                "guard.lr_factor_steps=2"]},
        {"stage": "mim", "deepspeed_config": str(tmp / "fp16.json"), "run_dir": str(tmp / "fp16"),
         "set": DEBUG + tok + QUICK + ["precision=fp16", "train.max_steps=9", "guard.skip_window=3",
                                       "guard.max_skips=2", "guard.inject=grad@3,grad@4,grad@5,grad@7,grad@8"]},
        {"stage": "mim", "deepspeed_config": zero2, "run_dir": str(tmp / "nan"),
         "set": fp32 + QUICK + ["train.max_steps=8", "guard.suspect_steps=2", "guard.max_rollbacks=1",
                                "guard.inject=nan@7/1"]},
    ]
    codes, logs = run_ranks(2, ["tests/drivers/multi_run.py", str(_spec(tmp, runs, fp16=True))], tmp / "logs",
                            timeout=600)
    return tmp, codes, logs


def _rows(run_dir, kind="train"):
    from launching import read_metrics
    return read_metrics(run_dir, kind)


def _final_state(run_dir):
    """(manifest, trainer state of each rank, consolidated weights) of the newest checkpoint."""
    import json

    from beit_scale.train.checkpoint import CheckpointManager
    from beit_scale.train.checkpoint.reader import consolidated_state_dict
    m = CheckpointManager(run_dir, None, {})
    path = m.complete_checkpoints()[-1]
    ranks = [json.loads((path / f"rank_{r:05d}.json").read_text())["trainer"] for r in range(2)]
    sd, manifest = consolidated_state_dict(path)
    return manifest, ranks, sd


def test_guard_off_and_on_without_fault_are_bit_identical(guard_runs):
    """The guard's per-step check (an all-reduce, a host sync, the detector) changes nothing: the
    guarded runs' steps before their first fault equal the unguarded run's bit for bit."""
    tmp, _, _ = guard_runs
    off = {r["step"]: r["loss"] for r in _rows(tmp / "off")}
    assert sorted(off) == list(range(1, 7))
    for name in ("nan", "spike"):
        first = {}
        for r in _rows(tmp / name):
            first.setdefault(r["step"], r["loss"])
        assert [first[s] for s in range(1, 5)] == [off[s] for s in range(1, 5)], name
    assert _rows(tmp / "off", "guard") == []


def test_nan_on_one_rank_rolls_back_skips_the_window_and_finishes(guard_runs):
    tmp, codes, logs = guard_runs
    assert codes == [5, 5], logs[-4000:]   # the resumed run past the bound, last, ends the process group
    run = tmp / "nan"
    manifest, ranks, sd = _final_state(run)   # the run's last checkpoint (the resumed run gave up before one)
    events = manifest["extra"]["guard"]["events"]
    # detected at step 5 (rank 1's loss is NaN; both ranks act: the sum of the losses is NaN);
    # step 4's checkpoint is inside guard.suspect_steps=2, so the target is step 2's
    assert len(events) == 1, events
    e = events[0]
    logged = _rows(run, "guard")[0]   # the metrics.jsonl record says the same
    assert all(logged[k] == e[k] for k in ("step", "reason", "action", "target_step", "skipped_samples"))
    assert (e["reason"], e["step"], e["action"], e["target_step"]) == ("nonfinite_loss", 5, "rolled_back", 2)
    assert e["skipped_samples"] == 3 * GB and e["skipped_from"] == [0, 2 * GB] and e["skipped_to"] == [0, 5 * GB]
    assert "guard: nonfinite_loss at step 5" in logs and "rolled back to step 2" in logs
    steps = [r["step"] for r in _rows(run)]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]   # the bad step is not logged; 3-5 trained again from step 2
    assert all(math.isfinite(r["loss"]) for r in _rows(run))
    assert "deleted the checkpoints saved after step 2 on the abandoned path: step_00000004" in logs
    # Consistent position: 6 steps in the weights, and the data position is past the 3 skipped
    # steps' samples.  No sample is trained twice: the re-trained steps 3-6 read the samples
    # after the bad window (positions 20-35), the rolled-back steps 3-5 had read positions 8-19.
    assert manifest["step"] == 6 and manifest["samples_seen"] == 6 * GB
    assert manifest["offset_in_epoch"] == (6 + 3) * GB
    assert ranks[0] == ranks[1] and ranks[0]["offset"] == (6 + 3) * GB   # both ranks rolled back alike
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_spike_is_detected_and_lr_scaled_after_rollback(guard_runs):
    tmp, _, _ = guard_runs
    events = _rows(tmp / "spike", "guard")
    assert [(e["reason"], e["step"], e["target_step"]) for e in events] == [("loss_spike", 5, 4)]
    off = {r["step"]: r for r in _rows(tmp / "off")}
    assert events[0]["loss"] > 20 * off[5]["loss"]   # the injected spike (x100 on one of 2 ranks)
    rows = _rows(tmp / "spike")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # lr x0.5 for 2 steps after the rollback to step 4 (steps 5 and 6 train with it): the lr logged
    # after step 5 (the next step's) is halved, the one after step 6 is the schedule's again
    assert rows[4]["lr"] == pytest.approx(0.5 * off[5]["lr"], rel=1e-12)
    assert rows[5]["lr"] == pytest.approx(off[6]["lr"], rel=1e-12)


def test_fp16_skip_storm_and_min_loss_scale_roll_back(guard_runs):
    """DeepSpeed's real fp16 path on CPU (test-only switch).  Injected inf gradients at steps 3, 4,
    5: three skipped steps within 3 steps is a storm -> back to step 4.  Then at 7 and 8 the scale
    halves to min_loss_scale=1 (where the next overflow would make DeepSpeed raise) -> back to 6.
    The run finishes."""
    tmp, _, logs = guard_runs
    events = _rows(tmp / "fp16", "guard")
    assert [(e["reason"], e["step"], e["target_step"]) for e in events] == [
        ("skip_storm", 5, 4), ("min_loss_scale", 8, 6)], events
    rows = _rows(tmp / "fp16")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9]   # no record of a detected step
    assert [r["loss_scale"] for r in rows] == [16, 16, 8, 4, 4, 4, 2, 4, 4, 4]
    assert "overflowed at the minimum loss scale" not in logs
    manifest, _, sd = _final_state(tmp / "fp16")
    assert manifest["step"] == 9 and manifest["precision"] == "fp16"
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_resumed_run_keeps_its_rollbacks_and_stops_beyond_the_bound(guard_runs):
    """The NaN run resumed (as after a preemption and requeue) with guard.max_rollbacks=1: the
    rollback at step 5 came back with the checkpoint, so a NaN at step 7 is one too many:
    diagnostic checkpoint, report, status 5 (launch/slurm/run.sh does not requeue it:
    tests/test_slurm.py)."""
    import json
    tmp, codes, logs = guard_runs
    assert codes == [5, 5], logs[-4000:]
    run = tmp / "nan"
    assert "resumed from" in logs and "at step 6" in logs
    events = _rows(run, "guard")
    assert [(e["reason"], e["step"], e["action"]) for e in events] == [
        ("nonfinite_loss", 5, "rolled_back"), ("nonfinite_loss", 7, "gave_up")]
    report = json.loads((run / "guard" / "report.json").read_text())
    assert report["exit_status"] == 5 and [e["step"] for e in report["events"]] == [5, 7]
    assert report["skipped_windows"] == [{"step": 5, "target_step": 2, "skipped_from": [0, 2 * GB],
                                          "skipped_to": [0, 5 * GB], "skipped_samples": 3 * GB}]
    assert [s for s, _ in report["history"]["losses"]][-2:] == [5, 6]   # the detector's history came back too
    diag = run / "guard" / "step_00000007"
    assert (diag / "COMPLETE").exists() and json.loads((diag / "manifest.json").read_text())["step"] == 7
    # never a resume candidate: LATEST still names the last good checkpoint in checkpoints/
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_00000006"
    assert "giving up: more than guard.max_rollbacks=1" in logs and "exiting with status 5" in logs
