"""CheckpointManager: saving, finding, verifying and loading checkpoints (layout: layout.py)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from beit_scale.config import ConfigError
from beit_scale.dist.env import say_rank0
from beit_scale.io import atomic_write_text
from beit_scale.train.checkpoint.layout import (COMPLETE, DS_LATEST, LATEST, MANIFEST, TASK_STATE,
                                                complete_checkpoints_in, file_crc32, read_manifest, step_of,
                                                tag_for, verify)

TRAINER = "trainer"   # the one stateful object every checkpoint must have: the loop's position


class Stateful(Protocol):
    """What the manager saves by name: JSON-able values and tensors in one dict."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)  # one name for the tests that watch every pointer write


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def split_states(states: Mapping[str, Stateful]) -> tuple[dict, dict]:
    """{name: obj} -> (JSON {name: non-tensor entries}, tensors {"name/key": tensor}); the trainer's
    own position is not in either (it goes into every rank's JSON file)."""
    extra, tensors = {}, {}
    for name, obj in states.items():
        if name == TRAINER:
            continue
        sd = obj.state_dict() or {}
        extra[name] = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"{name}/{k}": v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    return extra, tensors


def states_of(extra: dict, tensors: dict, name: str) -> dict | None:
    """One name's saved state (JSON entries and tensors together), None if it was not saved."""
    prefix = name + "/"
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if name not in extra and not mine:
        return None
    return {**(extra.get(name) or {}), **mine}


# ----------------------------------------------------------------------------- RNG state as JSON

def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


# ----------------------------------------------------------------------------- manager

def _delete(folder: Path) -> None:
    # The marker first: a crash mid-delete leaves an ignorable folder, not a "complete" one.
    marker = folder / COMPLETE
    if marker.exists():
        marker.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _unshare_optimizer_steps(zero_optimizer) -> int:
    """Give every parameter's optimizer state its own ``step`` tensor; returns how many were shared.

    DeepSpeed 0.19's ZeRO-3 universal loader stores ONE step tensor object in the state of every
    sub-group.  torch's Adam/AdamW increment ``step`` in place, once per sub-group per optimizer
    step, so with G param groups the shared counter advances G times per step and every group's
    bias correction runs ahead: the first step after the load is exact, the losses after it drift
    (~0.2-0.3 % with this project's decay / no-decay / layer-decay groups).
    """
    inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
    seen, shared = set(), 0
    for st in getattr(inner, "state", {}).values():
        step = st.get("step") if isinstance(st, dict) else None
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                st["step"] = step.clone()
                shared += 1
            seen.add(id(st["step"]))
    return shared


class CheckpointManager:
    def __init__(self, run_dir: str | Path, cfg, config_dict: dict, rank: int = 0, world_size: int = 1,
                 log=say_rank0):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.cfg = cfg
        self.config_dict = config_dict
        self.rank, self.world = rank, world_size
        self.log = log if rank == 0 else (lambda *a, **k: None)
        self._last_save_time = time.time()
        self._saved_step: int | None = None    # newest step saved by this process
        self._resumed_step: int | None = None  # step this process resumed from out of this run's checkpoints
        # The divergence guard's window (guard.suspect_steps): retention keeps a complete checkpoint
        # at least this many steps older than the newest, so a rollback target always exists.
        self.protect_steps = 0

    # ---------------------------------------------------------------- discovery (no process group needed)
    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints_in(self.dir)

    def latest_step(self) -> int | None:
        ckpts = self.complete_checkpoints()
        return step_of(ckpts[-1].name) if ckpts else None

    verify = staticmethod(verify)
    read_manifest = staticmethod(read_manifest)

    def select_resume(self) -> tuple[Path, dict] | None:
        """Which checkpoint to resume from, per checkpoint.resume; raises ConfigError on misuse."""
        mode = self.cfg.resume
        if mode == "none":
            if self.complete_checkpoints() and not self.cfg.overwrite:
                raise ConfigError(
                    f"{self.run_dir} already has checkpoints and checkpoint.resume=none would start over in it. "
                    f"Use another --run_dir, resume (checkpoint.resume=auto), or pass "
                    f"--set checkpoint.overwrite=true to discard them")
            return None
        if mode == "auto":
            found = self._newest_valid()
            if self.rank == 0:
                # The pointers follow what this run resumes from: past a corrupted newest
                # checkpoint they roll back to the one in use (or go when none is usable), so
                # DeepSpeed's tools never read a checkpoint we refused; a run saved before
                # `latest` existed gets it here.
                self._point_latest(found[0].name if found else None)
            return found
        path = Path(mode).expanduser()
        if (path / "checkpoints").is_dir():          # a run dir: its newest valid checkpoint (read only)
            other = CheckpointManager(path, type(self.cfg)(resume="auto"), {}, self.rank, self.world, self.log)
            found = other._newest_valid()
            if found is None:
                raise ConfigError(f"checkpoint.resume={mode}: that run dir has no complete checkpoint")
            return found
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume={mode}: no such checkpoint folder")
        reason = self.verify(path)
        if reason:
            raise ConfigError(f"checkpoint.resume={mode} is unusable: {reason}")
        return path, self.read_manifest(path)

    def _newest_valid(self) -> tuple[Path, dict] | None:
        for path in reversed(self.complete_checkpoints()):
            reason = self.verify(path)
            if reason is None:
                return path, self.read_manifest(path)
            warnings.warn(f"checkpoint {path} is unusable ({reason}); falling back to the previous one")
            self.log(f"WARNING: checkpoint {path.name} is unusable ({reason}); trying the previous one")
        return None

    # ---------------------------------------------------------------- LATEST / latest (rank 0 only)
    def pointed_tags(self) -> tuple[str | None, str | None]:
        """What LATEST and DeepSpeed's `latest` name now (None: no such file)."""
        out = []
        for name in (LATEST, DS_LATEST):
            try:
                out.append((self.dir / name).read_text().strip() or None)
            except FileNotFoundError:
                out.append(None)
        return out[0], out[1]

    def _point_latest(self, tag: str | None) -> None:
        """Point LATEST and DeepSpeed's `latest` at `tag`, a COMPLETE checkpoint; None removes both.

        Both get the same bytes, each through temp file + fsync + rename.  On a case-insensitive
        file system (macOS, Windows shares) the two names are one file: the second write replaces
        it with the same bytes, so either name reads the right tag; a removal removes it once.
        """
        if self.pointed_tags() == (tag, tag):
            return
        for name in (LATEST, DS_LATEST):
            if tag is None:
                (self.dir / name).unlink(missing_ok=True)
            else:
                _write_atomic(self.dir / name, tag + "\n")

    def prepare_load(self, found: tuple[Path, dict], ds_config: dict) -> tuple[Path, str, dict]:
        """Before the engine exists: decide how to load; convert for a new world size if needed.

        Returns (load_dir, tag, manifest); may switch ds_config to DeepSpeed's universal format.
        """
        path, manifest = found
        saved_world, zero = manifest["world_size"], manifest["zero_stage"]
        if saved_world == self.world or zero == 0:
            return path.parent, path.name, manifest
        uni = path.parent / f"{path.name}_universal"
        if not (uni / COMPLETE).exists():
            if self.rank == 0:
                self.log(f"elastic resume: {path.name} was saved by {saved_world} rank(s), this job has "
                         f"{self.world}; converting it to DeepSpeed's universal format in {uni.name}")
                self._convert_universal(path, uni)
            else:
                deadline = time.time() + 3600
                while not (uni / COMPLETE).exists():
                    if time.time() > deadline:
                        raise RuntimeError(f"timed out waiting for rank 0 to convert {path} to {uni}")
                    time.sleep(1)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return path.parent, uni.name, manifest

    @staticmethod
    def _convert_universal(src: Path, dst: Path) -> None:
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"universal conversion of {src} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        # The converter copies the model-states file; our per-rank state and manifest come along.
        for f in src.iterdir():
            if f.name.startswith("rank_") or f.name in (MANIFEST, TASK_STATE):
                shutil.copy2(f, tmp / f.name)
        (tmp / COMPLETE).write_text("converted\n")
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)

    # ---------------------------------------------------------------- load
    def load(self, engine, plan: tuple[Path, str, dict], states: Mapping[str, Stateful]) -> str:
        """Load the engine (model, optimizer, scheduler, loss scaler), every rank's RNG streams and
        each named object of `states` (its `load_state_dict` gets what its `state_dict` gave at the
        save; an object the checkpoint has nothing for is left as it is).  `states[TRAINER]` is
        required.  Returns the checkpoint folder."""
        load_dir, tag, manifest = plan
        groups = engine.optimizer.param_groups
        own = [{k: g[k] for k in ("weight_decay", "lr_scale", "name") if k in g} for g in groups]
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir / tag}")
        if tag.endswith("_universal"):
            # DeepSpeed's ZeRO-3 universal loader copies the hyper-parameters of param group 0
            # into every group, which would give biases/norms weight decay and flatten layer
            # decay.  The groups are ours: put their settings back, and the lr the restored
            # schedule says each group should have now.
            lrs = engine.lr_scheduler.get_last_lr() if engine.lr_scheduler is not None else None
            for i, (g, mine) in enumerate(zip(groups, own)):
                g.update(mine)
                if lrs is not None:
                    g["lr"] = lrs[i]
            _unshare_optimizer_steps(engine.optimizer)
        ckpt = load_dir / tag
        if Path(load_dir).resolve() == self.dir.resolve():
            self._resumed_step = manifest["step"]   # this run's state on disk is that step's
        same_world = manifest["world_size"] == self.world
        own = ckpt / f"rank_{self.rank:05d}.json"
        state = json.loads((own if same_world and own.exists() else ckpt / "rank_00000.json").read_text())
        states[TRAINER].load_state_dict(state["trainer"])
        if same_world:
            set_rng_state(state["rng"])
        else:
            # A different world has different RNG streams anyway; seed from the step.
            seed = manifest.get("seed", 0) + 1000003 * int(state["trainer"]["step"]) + self.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        extra, tensors = self.read_states(ckpt)
        for name, obj in states.items():
            saved = states_of(extra, tensors, name) if name != TRAINER else None
            if saved is not None:
                obj.load_state_dict(saved)
        _barrier()
        return str(ckpt)

    @staticmethod
    def read_states(ckpt: str | Path) -> tuple[dict, dict]:
        """What the named objects saved: (manifest["extra"], tensors of TASK_STATE or {})."""
        ckpt = Path(ckpt)
        extra = json.loads((ckpt / MANIFEST).read_text()).get("extra") or {}
        tensors = {}
        if (ckpt / TASK_STATE).exists():
            from safetensors.torch import load_file
            tensors = load_file(str(ckpt / TASK_STATE))
        return extra, tensors

    # ---------------------------------------------------------------- save
    def start_clock(self) -> None:
        self._last_save_time = time.time()

    def due_by_steps(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def clock_expired(self) -> bool:
        """checkpoint.every_minutes has passed on this rank's clock (rank 0's decides, through
        agree_stop_and_clock, so all ranks save together)."""
        return bool(self.cfg.every_minutes) and time.time() - self._last_save_time >= 60 * self.cfg.every_minutes

    def save(self, engine, states: Mapping[str, Stateful], *, wait: bool = True, into: Path | None = None) -> Path:
        """Write a checkpoint of the current step: the engine, and each named object's state_dict().

        `into`: a diagnostic copy (the divergence guard's, when it gives up) in that folder instead
        of checkpoints/: complete, with its manifest, but never pointed at, retained or resumed.

        `states[TRAINER]` (step, epoch, offset, samples_seen: all the manager reads of the loop)
        goes with the RNG streams into every rank's JSON file; the other objects' JSON entries go
        into the manifest's "extra" under their name, their tensors (the same on every rank) into
        TASK_STATE as "<name>/<key>", written by rank 0 and covered by the manifest's CRCs.

        Every rank writes its files and the ranks meet; what is left is rank 0's *finalization*:
        reading the files back for their CRC32s (the longest part after the write itself, ~0.2 s
        per GiB), the manifest, the COMPLETE marker, the LATEST and `latest` pointers, retention.  With
        ``wait=False`` that runs on a background thread of rank 0 while training goes on; until it
        is done the checkpoint has no COMPLETE marker, so a crash in between resumes from the
        previous one.  The next save, ``finish()`` and interpreter exit (the thread is not a
        daemon) wait for it; an error in it is raised there.
        """
        from beit_scale.train.engine import universal_checkpoint_client_state
        progress = states[TRAINER].state_dict()
        extra, tensors = split_states(states)
        step = progress["step"]
        tag = tag_for(step)
        path = Path(into or self.dir) / tag
        wait = wait or into is not None
        if self.rank == 0:
            self._join_finalize()  # the previous save's retention must not race this one
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():  # leftover of a save that crashed (no COMPLETE) or a re-save: start clean
                if into is None and tag in self.pointed_tags():  # never leave the pointers on a folder being replaced
                    older = [p for p in self.complete_checkpoints()
                             if p != path and self.verify(p, checksums=False) is None]
                    self._point_latest(older[-1].name if older else None)
                if (path / COMPLETE).exists():
                    (path / COMPLETE).unlink()
                shutil.rmtree(path)
        _barrier()
        t0 = time.time()
        # client_state carries the key the universal converter requires for ZeRO 1/2.
        # save_latest=False: DeepSpeed would write `latest` at the end of this call, before our
        # COMPLETE exists; _finalize writes it after COMPLETE instead.
        engine.save_checkpoint(str(path.parent), tag=tag, client_state=universal_checkpoint_client_state(),
                               save_latest=False)
        state = {"trainer": progress, "rng": rng_state(),
                 "data_order": {"seed": self.config_dict.get("train", {}).get("seed"),
                                "epoch": progress["epoch"], "offset": progress["offset"]}}
        _write_atomic(path / f"rank_{self.rank:05d}.json", json.dumps(state))
        if tensors and self.rank == 0:
            from beit_scale.io import save_safetensors
            save_safetensors({k: v.detach().cpu() for k, v in tensors.items()}, path / TASK_STATE)
        _barrier()  # every rank's files are on disk (or in the page cache) from here on
        if into is None:
            self._saved_step = step
        if self.rank == 0:
            manifest = {
                "format": "beit_scale-checkpoint-v1", "tag": tag, "step": step,
                "samples_seen": progress["samples_seen"], "epoch": progress["epoch"],
                "offset_in_epoch": progress["offset"],
                "world_size": self.world, "zero_stage": engine.zero_optimization_stage(),
                "precision": "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32",
                "seed": self.config_dict.get("train", {}).get("seed", 0),
                "stage": self.config_dict.get("stage"), "model": self.config_dict.get("model", {}).get("name"),
                "config": self.config_dict, "extra": extra, "created": time.time()}
            if wait:
                self._finalize(path, manifest, t0)
            else:
                self._finalize_thread = threading.Thread(target=self._finalize_guarded, args=(path, manifest, t0),
                                                         name=f"finalize-{tag}", daemon=False)
                self._finalize_thread.start()
        if wait:
            _barrier()  # no rank leaves before the checkpoint is complete
        self._last_save_time = time.time()
        return path

    def _finalize(self, path: Path, manifest: dict, t0: float) -> None:
        """Rank 0: CRC every file, then manifest -> COMPLETE -> LATEST + latest, then retention."""
        files = {}
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.name not in (MANIFEST, COMPLETE) and not f.name.startswith("."):
                files[str(f.relative_to(path))] = {"size": f.stat().st_size, "crc32": file_crc32(f)}
        manifest = dict(manifest, files=files)
        _write_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
        _write_atomic(path / COMPLETE, f"{manifest['step']}\n")
        if path.parent == self.dir:
            self._point_latest(path.name)
            self._retain(pinned=path)
        self.log(f"checkpoint saved: {path} ({sum(v['size'] for v in files.values()) / 2**20:.1f} MiB, "
                 f"{time.time() - t0:.1f}s)")

    def _finalize_guarded(self, *args) -> None:
        try:
            self._finalize(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread by _join_finalize
            self._finalize_error = e

    def _join_finalize(self) -> None:
        t = getattr(self, "_finalize_thread", None)
        if t is not None:
            t.join()
            self._finalize_thread = None
        err, self._finalize_error = getattr(self, "_finalize_error", None), None
        if err is not None:
            raise RuntimeError(f"finishing the previous checkpoint failed: {err}") from err

    def finish(self) -> None:
        """Wait until the last checkpoint is complete (rank 0 finalizes, every rank waits)."""
        if self.rank == 0:
            self._join_finalize()
        _barrier()

    def last_saved_step(self) -> int | None:
        """The newest step saved in this process (complete or being finalized), else the step this
        process resumed from out of this run's own checkpoints, else None.

        Not the highest step on disk: after auto-resume fell back past a corrupted newest
        checkpoint (or in a resume=none overwrite run) that folder is stale, and a run ending on
        the same step must still save its own checkpoint instead of skipping it."""
        return self._saved_step if self._saved_step is not None else self._resumed_step

    def _retain(self, pinned: Path | None = None) -> None:
        """Keep the last keep_last complete checkpoints plus every keep_every-th step, and `pinned`
        (the one LATEST / latest name: it is not the highest step when newer folders of an
        abandoned branch are on disk, e.g. after resuming from an explicitly chosen older one), and
        with the divergence guard on, the newest one at least protect_steps older than the newest."""
        complete = self.complete_checkpoints()
        if not complete:
            return
        newest = complete[-1]
        keep = set(complete[-self.cfg.keep_last:]) | {newest} | ({pinned} if pinned is not None else set())
        if self.cfg.keep_every:
            keep |= {p for p in complete if step_of(p.name) % self.cfg.keep_every == 0}
        newest_step = step_of(newest.name)
        if self.protect_steps:
            keep |= set([p for p in complete if step_of(p.name) <= newest_step - self.protect_steps][-1:])
        for p in self.dir.iterdir():
            if not p.is_dir() or not p.name.startswith("step_"):
                continue
            base = p.name.split("_universal")[0].removesuffix(".partial")
            s = step_of(base)
            if s >= newest_step:
                continue
            if (self.dir / base) in keep and "_universal" not in p.name:
                continue
            if "_universal" in p.name and (self.dir / base) in keep:
                continue
            _delete(p)

    # ---------------------------------------------------------------- the divergence guard (train/guard.py)
    def rollback_target(self, at_most_step: int) -> tuple[Path, dict] | None:
        """The newest complete checkpoint of this run at or before `at_most_step` (size-checked
        against its manifest: it was written by this run), or None.  Every rank calls it; rank 0
        first completes a save still being finalized, so all ranks see the same folders."""
        if self.rank == 0:
            self._join_finalize()
        _barrier()
        for path in reversed(self.complete_checkpoints()):
            if step_of(path.name) <= at_most_step and self.verify(path, checksums=False) is None:
                return path, self.read_manifest(path)
        return None

    def discard_after(self, step: int) -> None:
        """After a rollback to `step`: the newer checkpoints were saved on the abandoned path (maybe
        during the trouble), so LATEST / latest go back to `step` and the newer folders are deleted;
        the steps are trained again and saved anew.  Every rank calls it."""
        if self.rank == 0:
            gone = []
            self._point_latest(tag_for(step))
            for p in self.dir.iterdir():
                if p.is_dir() and p.name.startswith("step_") and \
                        step_of(p.name.split("_universal")[0].removesuffix(".partial")) > step:
                    _delete(p)
                    gone.append(p.name)
            if gone:
                self.log(f"deleted the checkpoints saved after step {step} on the abandoned path: "
                         f"{', '.join(sorted(gone))}")
        self._saved_step = step
        _barrier()
