"""CheckpointManager: exact mid-epoch resume after SIGKILL, SIGUSR1 graceful stop, corruption
fallback, retention, elastic resume across world sizes.  Real 2-rank DeepSpeed runs (ZeRO 2, fp32)."""
import json
import os
import re
import signal
import time

import pytest

from beit_scale.train.checkpoint import COMPLETE, CheckpointManager
from beit_scale.train.signals import REQUEUE_EXIT_CODE
from beit_scale.config import CheckpointCfg
from launching import losses, read_logs, read_metrics, run_ranks, start_ranks, wait_all, wait_for_step


def _argv(run_dir, tokenizer_file, *sets, ds="ds_configs/zero2.json"):
    base = ["model.name=beit_debug", "model.drop_path=0.1", "data.num_workers=2", "train.log_every=1",
            "train.eval_batches=1", "optim.warmup_steps=2", f"tokenizer.checkpoint={tokenizer_file}",
            "tokenizer.vocab_size=64", "train.global_batch=8", "train.micro_batch=2", "train.max_steps=8"]
    argv = ["launch/pretrain.py", "--deepspeed_config", ds, "--run_dir", str(run_dir)]
    for s in base + list(sets):
        argv += ["--set", s]
    return argv


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_file):
    """An uninterrupted 8-step run; it also checkpoints every 2 steps (retention is checked on it)."""
    tmp = tmp_path_factory.mktemp("ref")
    run_dir = tmp / "run"
    codes, logs = run_ranks(2, _argv(run_dir, tokenizer_file, "checkpoint.every_steps=2", "checkpoint.keep_last=2",
                                     "checkpoint.keep_every=4"), tmp / "logs")
    assert codes == [0, 0], logs[-3000:]
    return run_dir, losses(run_dir)


def test_retention_keeps_last_k_and_every_kth(reference):
    run_dir, _ = reference
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    # saved 2,4,6,8; keep_last=2 -> 6,8; keep_every=4 -> 4,8
    assert names == ["step_00000004", "step_00000006", "step_00000008"]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_00000008"
    assert _pointers_agree(run_dir / "checkpoints") == "step_00000008"   # DeepSpeed's `latest` too
    m = json.loads((run_dir / "checkpoints" / "step_00000008" / "manifest.json").read_text())
    assert m["step"] == 8 and m["world_size"] == 2 and m["zero_stage"] == 2 and m["precision"] == "fp32"
    assert m["samples_seen"] == 64 and m["config"]["model"]["name"] == "beit_debug"
    assert m["extra"]["task"]["tokenizer_checkpoint"].endswith("tokenizer.safetensors")
    assert any(f.startswith("rank_00001") for f in m["files"]) and all("crc32" in v for v in m["files"].values())


def test_exact_resume_after_sigkill(tmp_path, tokenizer_file, reference):
    """Killed mid-epoch after a checkpoint, resumed: every later loss equals the uninterrupted run, bit for bit."""
    _, ref = reference
    run_dir = tmp_path / "run"
    argv = _argv(run_dir, tokenizer_file, "checkpoint.every_steps=3")
    procs = start_ranks(2, argv, tmp_path / "logs1")
    wait_for_step(run_dir, 5, procs)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
    wait_all(procs)
    assert (run_dir / "checkpoints" / "step_00000003" / COMPLETE).exists()
    codes, logs = run_ranks(2, argv, tmp_path / "logs2")
    assert codes == [0, 0], logs[-3000:]
    # the kill lands after step 5; under load the step-6 save may have completed first
    m = re.search(r"resumed from \S*step_0*(\d+) at step", logs)
    assert m and int(m.group(1)) in (3, 6), logs[-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 9))  # metrics after the checkpoint were rewritten, not duplicated
    for s in range(int(m.group(1)) + 1, 9):
        assert got[s] == ref[s], (s, got[s], ref[s])


def test_sigusr1_saves_the_step_in_flight_and_exits_requeue(tmp_path, tokenizer_file, reference):
    _, ref = reference
    run_dir = tmp_path / "run"
    argv = _argv(run_dir, tokenizer_file, "train.max_steps=40")
    procs = start_ranks(2, argv, tmp_path / "logs")
    wait_for_step(run_dir, 2, procs)
    os.kill(procs[0].pid, signal.SIGUSR1)  # one rank only: the ranks must agree among themselves
    codes = wait_all(procs, timeout=300)
    logs = read_logs(tmp_path / "logs")
    assert codes == [REQUEUE_EXIT_CODE] * 2, logs[-3000:]
    last = read_metrics(run_dir)[-1]["step"]
    assert 2 <= last < 40
    ckpt = run_dir / "checkpoints" / f"step_{last:08d}"
    assert (ckpt / COMPLETE).exists() and CheckpointManager.verify(ckpt) is None
    assert "received SIGUSR1" in logs


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupt_latest_falls_back_to_previous(tmp_path, tokenizer_file, reference):
    run_dir, ref = reference
    run_dir = _copy_run(run_dir, tmp_path / "run")
    latest = run_dir / "checkpoints" / "step_00000008"
    victim = max((p for p in latest.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    # a half-written newer save (no COMPLETE marker) must be ignored too
    (run_dir / "checkpoints" / "step_00000009").mkdir()
    mgr = CheckpointManager(run_dir, CheckpointCfg(), {})
    with pytest.warns(UserWarning, match="truncated"):
        path, manifest = mgr.select_resume()
    assert path.name == "step_00000006"
    assert _pointers_agree(run_dir / "checkpoints") == "step_00000006"  # rolled back past the corrupted one
    # a missing file is detected as well
    os.remove(run_dir / "checkpoints" / "step_00000006" / "rank_00001.json")
    with pytest.warns(UserWarning, match="missing file"):
        assert mgr.select_resume()[0].name == "step_00000004"
    # the real launcher resumes from the good one and reproduces the reference losses
    codes, logs = run_ranks(2, _argv(run_dir, tokenizer_file), tmp_path / "logs")
    assert codes == [0, 0], logs[-3000:]
    assert "is unusable" in logs and "step_00000004" in logs
    got = losses(run_dir)
    for s in (5, 6, 7, 8):
        assert got[s] == ref[s]
    assert _pointers_agree(run_dir / "checkpoints") == "step_00000008"


def test_resume_none_refuses_to_overwrite(tmp_path, reference):
    from beit_scale.config import ConfigError
    run_dir, _ = reference
    with pytest.raises(ConfigError, match="already has checkpoints"):
        CheckpointManager(run_dir, CheckpointCfg(resume="none"), {}).select_resume()
    assert CheckpointManager(run_dir, CheckpointCfg(resume="none", overwrite=True), {}).select_resume() is None
    explicit = CheckpointManager(tmp_path, CheckpointCfg(resume=str(run_dir / "checkpoints" / "step_00000004")), {})
    assert explicit.select_resume()[1]["step"] == 4


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_elastic_resume_2_to_1_to_2(tmp_path, tokenizer_file, zero):
    """Saved by 2 ranks, resumed by 1, saved, resumed by 2 again.  The global data order and the
    global batch are unchanged, so losses follow an uninterrupted 2-rank run; they differ only by
    fp32 summation order across a different number of ranks (tolerance 1e-4)."""
    ds = f"ds_configs/zero{zero}.json"
    common = ("model.drop_path=0.0", "data.num_workers=0", "checkpoint.every_steps=2")
    ref_dir = tmp_path / "ref"
    codes, logs = run_ranks(2, _argv(ref_dir, tokenizer_file, *common, "train.max_steps=6", ds=ds), tmp_path / "l0")
    assert codes == [0, 0], logs[-3000:]
    ref = losses(ref_dir)
    run_dir = tmp_path / "run"
    for nproc, steps in ((2, 2), (1, 4), (2, 0)):
        codes, logs = run_ranks(nproc, _argv(run_dir, tokenizer_file, *common, "train.max_steps=6",
                                             f"train.stop_at_step={steps}", ds=ds),
                                tmp_path / f"l{nproc}_{steps}")
        assert codes == [0] * nproc, logs[-3000:]
        if steps != 2:
            assert "elastic resume" in logs and "resumed from" in logs
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    # Every stage, ZeRO 3's universal load included: identical up to summation order (1e-4).
    # (ZeRO 3 drifted by 0.2-0.3 % from the second step after a universal load until the loader
    # gave each param group its own Adam step counter: see checkpoint._unshare_optimizer_steps.)
    for s in range(1, 7):
        assert abs(got[s] - ref[s]) < 1e-4, (s, got[s], ref[s])
    m = json.loads((run_dir / "checkpoints" / "step_00000004" / "manifest.json").read_text())
    assert m["world_size"] == 1 and m["samples_seen"] == 32


class _FileEngine:
    """What CheckpointManager.save needs from a DeepSpeed engine: it writes one real file."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(os.urandom(1 << 16))

    def zero_optimization_stage(self):
        return 0

    def fp16_enabled(self):
        return False

    def bfloat16_enabled(self):
        return False


class _Steps:
    def __init__(self, step):
        self.step, self.samples_seen, self.epoch, self.offset = step, step * 8, 0, step * 8

    def state_dict(self):
        return {"step": self.step, "samples_seen": self.samples_seen, "epoch": 0, "offset": self.offset}


def test_background_finalize_completes_later_and_reports_errors(tmp_path, monkeypatch):
    """wait=False returns once the files are written; the checkpoint becomes COMPLETE (and LATEST)
    only when rank 0's background CRC/manifest pass ends: until then a resume takes the previous one."""
    import threading
    import beit_scale.train.checkpoint.manager as ck
    mgr = CheckpointManager(tmp_path, CheckpointCfg(keep_last=5), {"train": {"seed": 0}})
    mgr.save(_FileEngine(), {"trainer": _Steps(2)})                       # a complete one to fall back to
    gate, crc = threading.Event(), ck.file_crc32
    def gated(p):  # the finalizer thread waits for the gate; the main thread's checks do not
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(30)
        return crc(p)
    monkeypatch.setattr(ck, "file_crc32", gated)
    path = mgr.save(_FileEngine(), {"trainer": _Steps(4)}, wait=False)
    assert (path / "mp_rank_00_model_states.pt").exists() and not (path / COMPLETE).exists()
    assert mgr.last_saved_step() == 4 and mgr.latest_step() == 2
    assert mgr.select_resume()[0].name == "step_00000002"            # a crash now resumes from step 2
    gate.set()
    mgr.finish()
    assert (path / COMPLETE).exists() and mgr.latest_step() == 4
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_00000004"
    assert CheckpointManager.verify(path) is None                       # manifest CRCs match the files

    def broken(p):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(ck, "file_crc32", broken)
    bad = mgr.save(_FileEngine(), {"trainer": _Steps(6)}, wait=False)
    with pytest.raises(RuntimeError, match="disk full"):
        mgr.finish()
    assert not (bad / COMPLETE).exists() and mgr.latest_step() == 4


def _pointers_agree(ckpt_dir):
    """DeepSpeed's `latest` holds the same bytes as our LATEST, and names an intact COMPLETE folder."""
    upper, lower = ckpt_dir / "LATEST", ckpt_dir / "latest"
    assert upper.exists() == lower.exists()
    if not upper.exists():
        return None
    assert lower.read_bytes() == upper.read_bytes()
    tag = lower.read_text().strip()
    assert CheckpointManager.verify(ckpt_dir / tag) is None, tag
    return tag


def test_deepspeed_latest_follows_LATEST(tmp_path, monkeypatch):
    """`latest` (what zero_to_fp32.py and load_checkpoint(tag=None) read) equals LATEST after saves,
    background finalization, retention, a corrupted-newest fallback, a re-save of the same step and
    a save on an older branch; it is written only after its checkpoint's COMPLETE marker."""
    import threading
    import beit_scale.train.checkpoint.manager as ck
    ckpts = tmp_path / "checkpoints"
    writes, atomic = [], ck._write_atomic
    def checked(path, text):  # every pointer write names a folder that is COMPLETE at that moment
        if path.name in ("LATEST", "latest"):
            assert (path.parent / text.strip() / COMPLETE).exists(), text
            writes.append((path.name, text.strip()))
        atomic(path, text)
    monkeypatch.setattr(ck, "_write_atomic", checked)
    mgr = CheckpointManager(tmp_path, CheckpointCfg(keep_last=2), {"train": {"seed": 0}})
    for s in (2, 4, 6):
        mgr.save(_FileEngine(), {"trainer": _Steps(s)})
        assert _pointers_agree(ckpts) == f"step_{s:08d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]  # retention
    assert writes[-2:] == [("LATEST", "step_00000006"), ("latest", "step_00000006")]
    # background finalization: until COMPLETE exists the pointers stay on step 6
    gate, crc = threading.Event(), ck.file_crc32
    def gated(p):
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(30)
        return crc(p)
    monkeypatch.setattr(ck, "file_crc32", gated)
    path = mgr.save(_FileEngine(), {"trainer": _Steps(8)}, wait=False)
    assert not (path / COMPLETE).exists() and _pointers_agree(ckpts) == "step_00000006"
    gate.set()
    mgr.finish()
    assert _pointers_agree(ckpts) == "step_00000008"
    monkeypatch.setattr(ck, "file_crc32", crc)
    # corrupted newest (COMPLETE but truncated): auto-resume falls back, both pointers roll back
    victim = ckpts / "step_00000008" / "mp_rank_00_model_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(100)
    resumed = CheckpointManager(tmp_path, CheckpointCfg(keep_last=2), {"train": {"seed": 0}})
    with pytest.warns(UserWarning, match="truncated"):
        assert resumed.select_resume()[0].name == "step_00000006"
    assert _pointers_agree(ckpts) == "step_00000006"
    # the resumed run saves step 7, then step 8 again: the old step 8 is replaced, never pointed at
    resumed.save(_FileEngine(), {"trainer": _Steps(7)})
    assert _pointers_agree(ckpts) == "step_00000007"
    resumed.save(_FileEngine(), {"trainer": _Steps(8)})
    assert _pointers_agree(ckpts) == "step_00000008"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000007", "step_00000008"]
    # resumed explicitly from an older checkpoint: its next save is the newest *pointed* one and
    # retention keeps it although newer steps (the abandoned branch) are on disk
    branch = CheckpointManager(tmp_path, CheckpointCfg(keep_last=2, resume=str(ckpts / "step_00000007")),
                               {"train": {"seed": 0}})
    assert branch.select_resume()[0].name == "step_00000007"
    mgr.save(_FileEngine(), {"trainer": _Steps(9)})
    mgr.save(_FileEngine(), {"trainer": _Steps(10)})
    branch.save(_FileEngine(), {"trainer": _Steps(8)})       # replaces step 8; newer 9 and 10 are kept
    assert _pointers_agree(ckpts) == "step_00000008"
    # a re-save of the step the pointers name moves them to another intact one (the highest) first
    seen = []
    class _Peek(_FileEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            assert save_latest is False
            seen.append(branch.pointed_tags())
            super().save_checkpoint(save_dir, tag, client_state, save_latest)
    branch.save(_Peek(), {"trainer": _Steps(8)})
    assert seen == [("step_00000010", "step_00000010")] and _pointers_agree(ckpts) == "step_00000008"
    # nothing usable left: auto-resume starts over and removes both pointers
    for p in ckpts.glob("step_*"):
        (p / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.warns(UserWarning):
        assert CheckpointManager(tmp_path, CheckpointCfg(), {}).select_resume() is None
    assert not (ckpts / "LATEST").exists() and not (ckpts / "latest").exists()
