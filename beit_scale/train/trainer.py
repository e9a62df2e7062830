"""The one training loop, for every stage (tokenizer, MIM, fine-tuning).

The loop calls `engine(...)`, `engine.backward(loss)` and `engine.step()`; precision, ZeRO stage,
loss scaling and gradient clipping are the engine's business (ds_configs/*.json), so nothing
here branches on them.  Resume, signals and retention belong to the CheckpointManager.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from beit_scale.config import ExperimentCfg, dump_yaml
from beit_scale.dist.env import rank0_logger
from beit_scale.io import atomic_write_text
from beit_scale.train import optim as optim_lib
from beit_scale.train.callbacks import CpuMemoryProbe, ImageLogger
from beit_scale.train.checkpoint import TRAINER, CheckpointManager
from beit_scale.train.engine import (apply_activation_checkpointing, build_engine, engine_grad_norm,
                                     engine_loss_scale, is_min_loss_scale_error, optimizer_class, scheduler_lag)
from beit_scale.train.guard import Guard
from beit_scale.train.signals import DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE, SignalFlag, agree_stop_and_clock
from beit_scale.train.sampler import ResumableSampler, eval_keys

log = rank0_logger()

# Logged in metrics.jsonl but not repeated in the progress line (shown there in their own form
# or too technical for it).
_NOT_IN_PROGRESS_LINE = {"step", "epoch", "lr", "samples_per_sec", "skipped_steps", "tflops_per_device", "grad_norm",
                         "loss", "step_time_s", "flops_per_sample"}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """This process's memory high-water mark in bytes and what it measures (for scaling studies):
    the CUDA caching allocator's peak of allocated tensors on GPU, the peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    # VmHWM is this address space's high-water mark.  getrusage's ru_maxrss is not: Linux keeps
    # the maximum across fork+exec, so a run started by a big parent reports the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "cpu_max_rss"
    except OSError:
        pass
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"  # Linux: KiB


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """metrics.jsonl + tensorboard, rank 0 only.  On resume, later steps are dropped first."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tensorboard"),
                                purge_step=None if resume_step is None else resume_step + 1)
        self.file = open(self.path, "a")

    def write(self, record: dict, prefix: str = "train") -> None:
        record = dict(record, kind=prefix)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


class Trainer:
    def __init__(self, cfg: ExperimentCfg, task, ds_config: dict, run_dir: Path,
                 ckpt: CheckpointManager, resume: tuple | None = None, engine_builder=build_engine):
        """`engine_builder(model, optimizer, scheduler, ds_config, device)` makes the engine:
        DeepSpeed's (engine.build_engine), or a stand-in with the same small interface in
        unit tests (tests/test_trainer_unit.py), which need no process group."""
        self.cfg, self.task, self.ds_config, self.run_dir, self.ckpt = cfg, task, ds_config, run_dir, ckpt
        self.resume, self.engine_builder = resume, engine_builder
        task.configure(run_dir=run_dir)  # tasks that write beside the checkpoints (best weights) need it
        self.rank, self.world = rank(), world()
        self.is_main = self.rank == 0
        rank0_logger()  # its level follows RANK, exported by the launcher after this module was imported
        # The device this rank chose before the process group (beit_scale/dist/device.py); after
        # the engine exists it is the engine's (checked equal in build_engine).
        from beit_scale.dist.device import current_plan
        plan = current_plan()
        self.device = plan.torch_device if plan is not None else torch.device("cpu")
        self.step = 0
        self.epoch = 0
        self.offset = 0          # global samples consumed in the current epoch
        self.samples_seen = 0

    # ------------------------------------------------------------------ setup
    def _build(self):
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        # Memory held before the model exists (imports, process group): studies subtract it on CPU.
        self.mem_base = peak_memory(self.device)[0]
        for cb in self.callbacks:
            cb.on_build_start(self)
        model = self.task.build_model()
        self.ckpt_blocks = apply_activation_checkpointing(model, cfg.train.act_ckpt, cfg.train.act_ckpt_impl) \
            if hasattr(model, "blocks") else []
        groups = optim_lib.param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        if cfg.optim.layer_decay != 1.0:
            log.info("layer-wise lr decay groups:\n" + optim_lib.describe_groups(groups, cfg.optim.lr))
        opt, sched = optim_lib.build_optimizer_and_schedule(
            groups, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.warmup_steps,
            cfg.train.max_steps, cfg.optim.min_lr, optimizer_cls=optimizer_class(self.ds_config),
            schedule=cfg.optim.schedule)
        self.engine = self.engine_builder(model, opt, sched, self.ds_config, self.device)
        self.device = self.engine.device
        self.task.prepare(self.device)
        self.flops_per_sample = self.task.flops_per_sample()

    def _loader(self, dataset, sampler_or_keys, batch_size, persistent: bool = False):
        nw = self.cfg.data.num_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler_or_keys, num_workers=nw,
                          pin_memory=self.device.type == "cuda", drop_last=isinstance(sampler_or_keys, ResumableSampler),
                          # The training loader lives for the whole run: its workers are reused
                          # across epochs (the sampler is iterated in this process, so moving its
                          # position and calling iter() again is all a new epoch needs).
                          persistent_workers=persistent and nw > 0, prefetch_factor=4 if nw > 0 else None,
                          # A private generator: creating an iterator must not consume the global
                          # torch RNG, or a resumed run would draw different drop-path masks.
                          generator=torch.Generator(),
                          collate_fn=self.task.collate_fn())  # data.decode=cuda: JPEG bytes (gpu_decode.py)

    def _peak_memory(self) -> tuple[int, int, str]:
        """(peak bytes, bytes held before the model was built, what was measured)."""
        if self.mem_probe.peak_bytes is not None:
            return self.mem_probe.peak_bytes, 0, "cpu_tensor_peak"
        peak, kind = peak_memory(self.device)
        return peak, self.mem_base, kind

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "offset": self.offset,
                "samples_seen": self.samples_seen, "world_size": self.world}

    def load_state_dict(self, s: dict) -> None:
        self.step, self.epoch, self.offset = int(s["step"]), int(s["epoch"]), int(s["offset"])
        self.samples_seen = int(s["samples_seen"])

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Set up (build, resume, data), train until max_steps or a stop, finish."""
        self._setup()
        reason = self._train()
        return self._finish(reason)

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.mem_probe = CpuMemoryProbe(t.cpu_mem_profile_steps)
        # The divergence guard is called by the loop itself (after_step, before the other callbacks
        # see the weights); it is in the list for its state and its on_train_start.
        self.guard = Guard(cfg.guard) if cfg.guard.enabled else None
        self.agreed = None   # (stop, save now) when the guard's per-step all-reduce already agreed on them
        self.callbacks = [self.mem_probe, ImageLogger(t.image_log_every)] + self.task.callbacks() + \
            ([self.guard] if self.guard is not None else [])
        self._build()
        resumed_from = self._resume() if self.resume is not None else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        self.metrics = MetricsWriter(self.run_dir, self.step if resumed_from else None) if self.is_main else None

        self.train_ds = self.task.train_dataset()
        if len(self.train_ds) < t.global_batch:
            raise ValueError(f"the training set has {len(self.train_ds)} images, fewer than one global batch "
                             f"({t.global_batch}); lower train.global_batch or add data")
        self.sampler = ResumableSampler(len(self.train_ds), self.rank, self.world, t.seed)
        self.loader = self._loader(self.train_ds, self.sampler, t.micro_batch, persistent=True)
        self.data_iter = None
        self._banner(resumed_from)
        for cb in self.callbacks:
            cb.on_train_start(self)

    def _resume(self) -> Path:
        return self.ckpt.load(self.engine, self.resume, self._stateful())

    def _stateful(self) -> dict:
        """What a checkpoint keeps beside the engine, by name: the loop's position, the task, and
        every callback with a key."""
        states = {TRAINER: self, "task": self.task}
        states.update({cb.key: cb for cb in self.callbacks if cb.key is not None})
        return states

    def _banner(self, resumed_from) -> None:
        t, e = self.cfg.train, self.engine
        prec = "fp16" if e.fp16_enabled() else "bf16" if e.bfloat16_enabled() else "fp32"
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in e.module.parameters())  # ZeRO-3: full size
        name = self.cfg.model.name if self.task.name != "tokenizer" else "dVAE"
        log.info(f"[{self.task.name}] {name}: {n_params / 1e6:.2f}M params | {self.world} rank(s) on "
                 f"{self.device.type} | ZeRO {e.zero_optimization_stage()} | {prec} | global batch {t.global_batch} "
                 f"= {t.micro_batch} x {self.world} x {e.gradient_accumulation_steps()} | {len(self.train_ds)} "
                 f"training images | act ckpt blocks {self.ckpt_blocks or 'none'}"
                 + (f" | MIM target {self.cfg.mim.target}, {self.cfg.data.mask_mode} masking"
                    if self.task.name == "mim" else ""))
        if resumed_from:
            log.info(f"resumed from {resumed_from} at step {self.step} (epoch {self.epoch}, "
                     f"{self.offset} samples into it)")

    def _train(self) -> str | None:
        """The loop: step, log, evaluate, checkpoint.  Returns why it stopped early, or None."""
        t = self.cfg.train
        self.signals = SignalFlag.install()
        self.engine.train()
        self.window_start, self.window_samples = time.time(), 0
        self.start_time, self.start_step = time.time(), self.step
        self.sums, self.n_sums = {}, 0
        self.ckpt.start_clock()
        try:
            while self.step < t.max_steps:
                outcome = self._train_step()
                if outcome == "rolled_back":
                    continue   # the state is now an older checkpoint's: nothing new to log or save
                if outcome:
                    return outcome
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._log()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    self.evaluate()
                reason = self._checkpoint_or_stop()
                if reason:
                    return reason
            return None
        finally:
            self.signals.restore()

    def _next_batch(self):
        """The next micro batch of this rank; a finished epoch moves the sampler to the next one."""
        if self.data_iter is None:
            self.sampler.set_position(self.epoch, self.offset)
            self.data_iter = iter(self.loader)
        batch = next(self.data_iter, None)
        if batch is None:
            self.epoch, self.offset = self.epoch + 1, 0
            self.sampler.set_position(self.epoch, 0)
            self.data_iter = iter(self.loader)
            batch = next(self.data_iter)
        return batch

    def _train_step(self) -> str | None:
        """One optimizer step (gradient accumulation inside).  None when done; "diverged" (fp16 at
        the minimum loss scale overflowed again), or the guard's "rolled_back" / "gave_up"."""
        t = self.cfg.train
        accum = self.engine.gradient_accumulation_steps()
        step_loss = 0.0
        for _ in range(accum):
            batch = self._next_batch()
            loss, m = self.task.step(self.engine, batch, self.step)
            if self.guard is not None:
                loss = self.guard.maybe_inject(loss, self.step + 1, self.rank)   # guard.inject only
                step_loss = step_loss + loss.detach().float()
            try:
                self.engine.backward(loss)
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - only DeepSpeed's min-loss-scale abort is handled
                if not is_min_loss_scale_error(e):
                    raise
                return "diverged"
            self.offset += t.micro_batch * self.world
            for k, v in dict(m, loss=loss).items():
                self.sums[k] = self.sums.get(k, 0) + v.detach().float().to(self.device)
            self.n_sums += 1
        self.step += 1
        self.samples_seen += t.global_batch
        self.window_samples += t.global_batch
        self.last_batch = batch
        if self.guard is not None:
            outcome = self.guard.after_step(self, step_loss / accum)   # the step's one collective
            if outcome is not None:
                return outcome
        for cb in self.callbacks:
            cb.on_step_end(self)
        return None

    def continue_from(self, epoch: int, offset: int) -> None:
        """After the guard rolled the state back: read data from (epoch, offset) on, not from the
        restored checkpoint's position; the metric sums of the abandoned steps are dropped."""
        self.epoch, self.offset, self.data_iter = epoch, offset, None
        self.sums, self.n_sums = {}, 0
        self.window_start, self.window_samples = time.time(), 0
        self.start_time, self.start_step = time.time(), self.step

    def _log(self) -> None:
        """metrics.jsonl, tensorboard and one progress line with the ETA (rank 0); every rank
        takes part in the reductions."""
        t, e = self.cfg.train, self.engine
        record = self._reduce_metrics(self.sums, self.n_sums)
        self.sums, self.n_sums = {}, 0
        elapsed = time.time() - self.window_start
        sps = self.window_samples / max(elapsed, 1e-9)
        record.update(step=self.step, epoch=self.epoch, lr=e.get_lr()[0], samples_per_sec=sps,
                      skipped_steps=int(e.skipped_steps))
        for key, value in (("grad_norm", engine_grad_norm(e)), ("loss_scale", engine_loss_scale(e)),
                           # fp16 skipped steps do not advance DeepSpeed's lr scheduler: the lr
                           # logged is the schedule's value `lag` steps behind train.step.
                           ("sched_lag_steps", scheduler_lag(e, self.step))):
            if value is not None:
                record[key] = value
        peak, base, kind = self._peak_memory()
        split = self.cfg.data.train_split
        # One reduction for the worst rank's memory and the unreadable files any rank has met
        # (every rank logs here, so no hang).
        peak, base, unreadable = self._max_over_ranks(peak, base, len(self.task.unreadable(split)))
        record.update(peak_mem_bytes=peak, peak_mem_base_bytes=base, peak_mem_kind=kind)
        record["unreadable_train"] = self._check_unreadable(split, unreadable, len(self.train_ds))
        record["step_time_s"] = elapsed / max(self.window_samples / t.global_batch, 1)
        if self.flops_per_sample:
            record["flops_per_sample"] = self.flops_per_sample
            record["tflops_per_device"] = self.flops_per_sample * sps / self.world / 1e12
        self.window_start, self.window_samples = time.time(), 0
        if not self.is_main:
            return
        self.metrics.write(record)
        rate = (time.time() - self.start_time) / max(self.step - self.start_step, 1)
        shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in _NOT_IN_PROGRESS_LINE
                         and isinstance(v, float))
        log.info(f"[{self.task.name}] step {self.step}/{t.max_steps} ({100 * self.step / t.max_steps:.0f}%) "
                 f"loss {record['loss']:.4f} {shown} lr {record['lr']:.2e} {sps:.1f} img/s "
                 f"ETA {_fmt_time(rate * (t.max_steps - self.step))}")

    def _checkpoint_or_stop(self) -> str | None:
        """Save when due; on a signal or train.stop_at_step save and return why we stop.

        Signals and rank 0's checkpoint clock cost one collective and one host sync every
        train.sync_every steps, not every step (none of their own with the guard on: its per-step
        all-reduce carries them)."""
        t = self.cfg.train
        stop = clock = False
        if self.step % t.sync_every == 0:
            agreed, self.agreed = self.agreed, None
            stop, clock = agreed or agree_stop_and_clock(self.signals, self.is_main and self.ckpt.clock_expired(),
                                                         self.device)
        planned = bool(t.stop_at_step) and self.step >= t.stop_at_step
        if stop or planned:
            self._save()
            return self.signals.name if stop else "stop_at_step"
        if clock or self.ckpt.due_by_steps(self.step):
            self._save(wait=not self.cfg.checkpoint.background_finalize)
        return None

    def _finish(self, reason: str | None) -> dict:
        """The last save, the final evaluation when training is done, and what the launcher needs."""
        t = self.cfg.train
        if reason in (None, "diverged") and self.ckpt.last_saved_step() != self.step:
            self._save()
        if reason == "diverged":
            return self._diverged()
        if reason == "gave_up":   # the guard saved its diagnostic checkpoint and report; the weights may be bad
            self._close()
            return {"guard_gave_up": True, "step": self.step}
        if reason == "stop_at_step":
            log.info(f"stopped at train.stop_at_step={t.stop_at_step} with a checkpoint; run the same "
                     f"command without it to continue")
            self._close()
            return {"paused": True, "step": self.step}
        if reason is not None:
            log.info(f"received {reason}: saved step {self.step}; exiting with status {REQUEUE_EXIT_CODE} "
                     f"so the scheduler can requeue")
            self._close()
            return {"stopped": reason, "step": self.step}
        final = self.evaluate()
        self._close()
        return final

    def _diverged(self) -> dict:
        """DeepSpeed's fp16 loss scale sat at min_loss_scale and overflowed again: it raises there
        instead of skipping.  The weights are those of the last finished step (the failed one made
        no update); they were saved just before this, so nothing is lost."""
        log.error(f"error: fp16 gradients overflowed at the minimum loss scale ({engine_loss_scale(self.engine)}) "
                  f"during step {self.step + 1}: training has diverged. Saved step {self.step} in {self.ckpt.dir}. "
                  f"Resume from it with a lower optim.lr, bf16 (--set precision=bf16 on A100/H100), or a "
                  f"lower min_loss_scale in the DeepSpeed file; exiting with status {DIVERGED_EXIT_CODE} "
                  f"(not requeued)")
        self._close()
        return {"diverged": True, "step": self.step}

    def _save(self, wait: bool = True) -> None:
        self.ckpt.save(self.engine, self._stateful(), wait=wait)

    def _reduce_metrics(self, sums: dict, n: int) -> dict:
        keys = sorted(sums)
        vec = torch.stack([sums[k] for k in keys]) / max(n, 1)
        if dist.is_initialized():
            dist.all_reduce(vec)
            vec /= self.world
        return {k: float(v) for k, v in zip(keys, vec.tolist())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        t = self.cfg.train
        ds = self.task.eval_dataset()
        limit = t.eval_batches * t.micro_batch * self.world if t.eval_batches else None
        keys, n_valid = eval_keys(len(ds), self.rank, self.world, limit, t.seed)
        loader = self._loader(ds, keys, t.micro_batch)
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        for batch in loader:
            bs = len(batch[0])
            valid = max(0, min(bs, n_valid - seen))
            seen += bs
            # Padding only (valid == 0): still run the forward so ZeRO-3 gathers stay in lockstep.
            n = valid or bs
            out = self.task.eval_batch(self.engine, batch, n)
            for cb in self.callbacks:
                out.update(cb.eval_batch(self, batch, n))
            if valid == 0:
                out = {k: torch.zeros_like(v) for k, v in out.items()}
            for k, v in out.items():
                # float64 stays float64: counts past 2^24 (a segmentation confusion matrix over
                # a validation set) are not exact in float32
                sums[k] = sums.get(k, 0) + (v if v.dtype == torch.float64 else v.float())
        self.engine.train()
        if dist.is_initialized():
            for k in sorted(sums):
                dist.all_reduce(sums[k])
        result = self.task.finish_eval(sums)
        unreadable_val = self._unreadable_count(self.cfg.data.val_split, len(ds))
        for cb in self.callbacks:
            cb.on_eval_end(self, result)
        if self.is_main:
            self.metrics.write(dict(result, step=self.step, unreadable_val=unreadable_val), prefix="eval")
            for line in self.task.summary(result):
                log.info(line)
        return result

    def _max_over_ranks(self, *values: int) -> list[int]:
        v = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return [int(x) for x in v.tolist()]

    def _unreadable_count(self, split: str, total: int) -> int:
        n, = self._max_over_ranks(len(self.task.unreadable(split)))
        return self._check_unreadable(split, n, total)

    def _check_unreadable(self, split: str, n: int, total: int) -> int:
        """`n`: unreadable files of `split` met so far by any worker of any rank, each counted once
        (the run dir's journal, beit_scale/data/datasets.py), agreed by every rank (MAX), so more
        than data.max_unreadable_frac of the split fails the run on every rank at once."""
        limit = self.cfg.data.max_unreadable_frac
        if n > limit * total:
            self._report_unreadable()
            raise RuntimeError(f"{n} of the {total} files of the '{split}' split are unreadable, more than "
                               f"data.max_unreadable_frac={limit}; the list is in "
                               f"{self.run_dir / 'unreadable_files.txt'}. Fix or remove those files, or "
                               f"raise data.max_unreadable_frac")
        return n

    def _report_unreadable(self) -> None:
        """Rank 0: every unreadable file met in this run dir, by split, to unreadable_files.txt,
        and one line naming the first few."""
        splits = (self.cfg.data.train_split, self.cfg.data.val_split)
        found = {s: self.task.unreadable(s) for s in splits}
        total = sum(len(v) for v in found.values())
        if not self.is_main or total == 0:
            return
        out = self.run_dir / "unreadable_files.txt"
        atomic_write_text(out, "".join(f"{s}\t{path}\t{reason}\n" for s in splits for path, reason in found[s]))
        first = [path for s in splits for path, _ in found[s]][:5]
        counts = ", ".join(f"{s} {len(v)}" for s, v in found.items())
        log.warning(f"skipped {total} unreadable file(s) ({counts}): {', '.join(first)}"
                    f"{' ...' if total > len(first) else ''}; full list in {out}")

    def _close(self) -> None:
        self._report_unreadable()
        self.ckpt.finish()  # a checkpoint still being finalized in the background is complete after this
        if self.metrics is not None:
            self.metrics.close()
