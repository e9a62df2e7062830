"""The divergence guard: detect a NaN, an fp16 skip storm or a loss spike, roll back in the same
process to the newest checkpoint before the trouble, skip the batches that led to it, go on.

The routine the BEiT / MAE maintainers give for a diverged run (restart from the nearest good
checkpoint, skip ahead, maybe lower the lr), done by the trainer itself and bounded: past
`guard.max_rollbacks` rollbacks within `guard.rollback_period` steps it saves a diagnostic
checkpoint, writes a report and exits with GUARD_EXIT_CODE, which the Slurm wrapper does not
requeue.

Three parts:
- `Detector`: pure Python.  One record per optimizer step (global loss, grad norm, skipped or
  not, loss scale) in, a reason or None out.  Every rank feeds it the same all-reduced numbers,
  so every rank reaches the same verdict without another collective.
- Fault injection (`guard.inject`, off by default; tests and drills): makes the loss or its
  gradient non-finite, or multiplies the loss, at a chosen step on one rank.
- `Guard`, the trainer callback: the per-step check, the rollback, the bound, the report.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from beit_scale.dist.env import say_rank0
from beit_scale.io import atomic_write_text
from beit_scale.train.callbacks import Callback
from beit_scale.train.engine import engine_loss_scale

GUARD_EXIT_CODE = 5   # "the guard gave up: repeated divergence; diagnostic saved; do not requeue"

# The reasons a step is declared bad, as they appear in metrics.jsonl / the report.
NONFINITE_LOSS, NONFINITE_GRAD = "nonfinite_loss", "nonfinite_grad"
SKIP_STORM, MIN_LOSS_SCALE = "skip_storm", "min_loss_scale"
LOSS_SPIKE, GRAD_SPIKE = "loss_spike", "grad_spike"
FP16_REASONS = (SKIP_STORM, MIN_LOSS_SCALE)
SPIKE_REASONS = (LOSS_SPIKE, GRAD_SPIKE)


# ----------------------------------------------------------------------------- detector

@dataclass
class DetectorCfg:
    """The thresholds (config.GuardCfg carries the same names)."""
    warmup_steps: int = 200
    loss_window: int = 100
    spike_steps: int = 5
    spike_factor: float = 2.0
    grad_spike_factor: float | None = None
    skip_window: int = 50
    max_skips: int = 10


class Detector:
    """Decides, step by step, whether training has gone wrong.

    `observe(step, loss, grad_norm, skipped, loss_scale)` is called once per optimizer step with
    the global numbers; it returns the reason the step is bad, or None.  `fp16` and
    `min_loss_scale` describe the engine: with fp16 a skipped step is DeepSpeed's normal reaction
    to an overflow (counted toward a storm); without it a skipped step means non-finite gradients.
    """

    def __init__(self, cfg: DetectorCfg, fp16: bool = False, min_loss_scale: float | None = None):
        self.cfg, self.fp16, self.min_loss_scale = cfg, fp16, min_loss_scale
        # (step, value) of finite values after warm-up; the newest spike_steps are "recent",
        # up to loss_window before them the reference whose median a spike is measured against.
        keep = cfg.loss_window + cfg.spike_steps
        self.losses: deque = deque(maxlen=keep)
        self.grad_norms: deque = deque(maxlen=keep)
        self.skips: deque = deque()   # steps DeepSpeed skipped (fp16), inside the storm window

    def observe(self, step: int, loss: float, grad_norm: float | None = None, skipped: bool = False,
                loss_scale: float | None = None) -> str | None:
        c = self.cfg
        exempt = step <= c.warmup_steps
        if self.fp16:
            if loss_scale is not None and self.min_loss_scale is not None and loss_scale <= self.min_loss_scale:
                return MIN_LOSS_SCALE
            while self.skips and self.skips[0] <= step - c.skip_window:
                self.skips.popleft()
            if skipped:
                # DeepSpeed's answer to an fp16 overflow (inf loss or gradients): nothing was written.
                # One is routine (the loss-scale search); many in a row are a storm.
                if not exempt:
                    self.skips.append(step)
                return SKIP_STORM if len(self.skips) > c.max_skips else None
        if not math.isfinite(loss):
            return NONFINITE_LOSS
        # bf16/fp32: ZeRO 1/2 skip a step whose gradients are not finite; ZeRO 0 would apply it
        if skipped or (grad_norm is not None and not math.isfinite(grad_norm)):
            return NONFINITE_GRAD
        if exempt:
            return None
        self.losses.append((step, loss))
        if _spike(self.losses, c.spike_steps, c.loss_window, c.spike_factor):
            return LOSS_SPIKE
        if c.grad_spike_factor and grad_norm is not None:
            self.grad_norms.append((step, grad_norm))
            if _spike(self.grad_norms, c.spike_steps, c.loss_window, c.grad_spike_factor):
                return GRAD_SPIKE
        return None

    def truncate(self, step: int) -> None:
        """Forget everything after `step` (the rollback target): those steps are trained again."""
        for q in (self.losses, self.grad_norms):
            while q and q[-1][0] > step:
                q.pop()
        while self.skips and self.skips[-1] > step:
            self.skips.pop()

    def history(self) -> dict:
        """The values the verdicts were based on (for the report)."""
        return {"losses": [list(x) for x in self.losses], "grad_norms": [list(x) for x in self.grad_norms],
                "skipped_steps": list(self.skips)}

    def state_dict(self) -> dict:
        return self.history()

    def load_state_dict(self, s: dict) -> None:
        self.losses.clear()
        self.losses.extend((int(a), float(b)) for a, b in s.get("losses", []))
        self.grad_norms.clear()
        self.grad_norms.extend((int(a), float(b)) for a, b in s.get("grad_norms", []))
        self.skips = deque(int(x) for x in s.get("skipped_steps", []))


def _spike(series: deque, recent: int, window: int, factor: float) -> bool:
    """Mean of the newest `recent` values > factor x median of the (up to `window`) values before
    them.  Needs a reference of at least half a window (a fresh or rolled-back history waits)."""
    n = len(series)
    ref_n = n - recent
    if ref_n < max(recent, window // 2):
        return False
    values = [v for _, v in series]
    median = statistics.median(values[max(0, ref_n - window):ref_n])
    return median > 0 and sum(values[ref_n:]) / recent > factor * median


# ----------------------------------------------------------------------------- fault injection

FAULT_KINDS = ("nan", "grad", "spike")
_FAULT = re.compile(r"^(?P<kind>[a-z]+)@(?P<step>\d+)(?:/(?P<rank>\d+))?(?:x(?P<factor>[0-9.eE+-]+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str        # nan: the loss becomes NaN; grad: the loss stays, its gradient is inf; spike: loss x factor
    step: int        # the step number as metrics.jsonl counts it (1 = the first step)
    rank: int = 0    # the one rank it happens on
    factor: float = 100.0

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.step}/{self.rank}"


def parse_faults(spec: str | None) -> list[Fault]:
    """`"nan@7/1,grad@9,spike@12x50"` -> faults; raises ValueError with the accepted syntax."""
    faults = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = _FAULT.match(item)
        if m is None or m["kind"] not in FAULT_KINDS or int(m["step"]) < 1 or \
                (m["factor"] is not None and m["kind"] != "spike"):
            raise ValueError(f"guard.inject item {item!r}: use KIND@STEP[/RANK][xFACTOR] with KIND one of "
                             f"{', '.join(FAULT_KINDS)}, STEP >= 1 (xFACTOR for spike only), comma-separated, "
                             f"e.g. nan@7/1,spike@12x50")
        factor = float(m["factor"]) if m["factor"] else Fault.factor
        faults.append(Fault(m["kind"], int(m["step"]), int(m["rank"] or 0), factor))
    return faults


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward sends an infinite gradient (an overflow with a finite loss)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def inject(loss: torch.Tensor, fault: Fault) -> torch.Tensor:
    if fault.kind == "nan":
        return loss * float("nan")
    if fault.kind == "grad":
        return _InfGrad.apply(loss)
    return loss * fault.factor


# ----------------------------------------------------------------------------- bookkeeping

@dataclass
class Event:
    """One detection and what was done about it (a metrics.jsonl "guard" record)."""
    step: int                    # the step at which it was detected
    reason: str
    loss: float
    grad_norm: float | None
    action: str                  # rolled_back | continued (no checkpoint old enough) | gave_up
    target_step: int | None = None
    skipped_from: tuple | None = None   # (epoch, offset) where the skipped samples start ...
    skipped_to: tuple | None = None     # ... and where training goes on
    skipped_samples: int = 0


def rollbacks_within(events: list[dict], step: int, period: int) -> int:
    """Rollbacks whose detection step lies in the last `period` steps up to `step`."""
    return sum(1 for e in events if e["action"] == "rolled_back" and e["step"] > step - period)


def event_record(e: Event) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(e).items()}


# ----------------------------------------------------------------------------- the callback

class Guard(Callback):
    """The trainer's divergence guard (a callback with key "guard"; see the module docstring).

    The trainer calls `after_step(trainer, loss)` once per optimizer step, right after
    engine.step() and before the other callbacks: `loss` is this rank's mean loss of the step (a
    device tensor).  It returns None (go on), "rolled_back" (the trainer's state is now the
    target checkpoint's: skip logging / eval / saving for this iteration) or "gave_up".

    It is also where the ranks agree on the step: ONE all-reduce carries the loss, the grad norm
    and, every train.sync_every steps, the stop signal and rank 0's checkpoint clock (the result
    is left in `trainer.agreed` for the loop's save/stop decision, which then needs no collective
    of its own).
    """

    key = "guard"

    def __init__(self, cfg):
        self.cfg = cfg
        self.detector = Detector(DetectorCfg(
            warmup_steps=cfg.warmup_steps, loss_window=cfg.loss_window, spike_steps=cfg.spike_steps,
            spike_factor=cfg.spike_factor, grad_spike_factor=cfg.grad_spike_factor,
            skip_window=cfg.skip_window, max_skips=cfg.max_skips))
        self.faults = parse_faults(cfg.inject)
        self.fired: list[str] = []      # faults already injected (each fires once, even after a rollback)
        self.events: list[dict] = []
        self.lr_until = 0               # lr x cfg.lr_factor while trainer.step < lr_until
        self.seconds = 0.0              # time spent in after_step's own work (the benchmark reads it)
        self._skipped = 0

    # ---------------------------------------------------------------- callback hooks
    def on_train_start(self, trainer) -> None:
        e = trainer.engine
        self.detector.fp16 = bool(e.fp16_enabled())
        self.detector.min_loss_scale = float(trainer.ds_config.get("fp16", {}).get("min_loss_scale", 1.0)) \
            if self.detector.fp16 else None
        self._skipped = int(e.skipped_steps)
        trainer.ckpt.protect_steps = self.cfg.suspect_steps  # retention keeps a rollback target
        ck = trainer.cfg.checkpoint
        if not (ck.every_steps or ck.every_minutes):
            say_rank0("note: guard on but no periodic checkpoints (checkpoint.every_steps / every_minutes are 0): "
                      "it can detect divergence but has nothing to roll back to")
        if self.faults and trainer.is_main:
            say_rank0(f"guard: fault injection on (guard.inject={self.cfg.inject}): "
                     f"{', '.join(f.name for f in self.faults if f.name not in self.fired) or 'all fired'}")

    def state_dict(self) -> dict:
        return {"events": self.events, "fired": self.fired, "lr_until": self.lr_until,
                "detector": self.detector.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.events = list(s.get("events", []))
        self.fired = list(s.get("fired", []))
        self.lr_until = int(s.get("lr_until", 0))
        self.detector.load_state_dict(s.get("detector", {}))

    # ---------------------------------------------------------------- fault injection
    def maybe_inject(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """`loss` of the step numbered `step` (1-based) on `rank`, with a configured fault applied
        the first time that step is trained.  Called on every rank (the bookkeeping of which
        faults fired must be the same everywhere)."""
        for f in self.faults:
            if f.step == step and f.name not in self.fired:
                self.fired.append(f.name)
                if f.rank == rank:
                    loss = inject(loss, f)
        return loss

    # ---------------------------------------------------------------- the check
    def after_step(self, trainer, loss: torch.Tensor) -> str | None:
        t0 = time.perf_counter()
        values = self._agree(trainer, loss)
        e = trainer.engine
        skipped = int(e.skipped_steps) > self._skipped
        self._skipped = int(e.skipped_steps)
        reason = self.detector.observe(trainer.step, values["loss"], values["grad_norm"], skipped,
                                       engine_loss_scale(e))
        if reason is None:
            if trainer.step < self.lr_until:
                self._scale_lr(e, self.cfg.lr_factor)
            self.seconds += time.perf_counter() - t0
            return None
        return self._respond(trainer, reason, values)

    def _agree(self, trainer, loss: torch.Tensor) -> dict:
        """The step's one collective (SUM) and one host sync."""
        dev = loss.device
        gn = trainer.engine.get_global_grad_norm()
        has_gn = gn is not None
        # the grad norm is the same on every rank: rank 0's alone goes into the sum (exact)
        gn_t = torch.as_tensor(gn if has_gn and trainer.rank == 0 else 0.0, dtype=torch.float32, device=dev)
        sync = trainer.step % trainer.cfg.train.sync_every == 0
        flags = [1.0 if trainer.signals.name else 0.0,
                 1.0 if sync and trainer.is_main and trainer.ckpt.clock_expired() else 0.0]
        vec = torch.cat([loss.detach().float().reshape(1), gn_t.reshape(1), torch.tensor(flags, device=dev)])
        if dist.is_initialized():
            dist.all_reduce(vec)
        v = vec.tolist()
        if sync:
            trainer.agreed = (v[2] > 0, v[3] > 0)
            if v[2] > 0 and trainer.signals.name is None:
                trainer.signals.name = "signal on another rank"
        return {"loss": v[0] / trainer.world, "grad_norm": v[1] if has_gn else None}

    @staticmethod
    def _scale_lr(engine, factor: float) -> None:
        # The schedule (LambdaLR) recomputes every group's lr from its base at each step, so the
        # factor is applied again after every step of the window and simply not after it.
        for g in engine.optimizer.param_groups:
            g["lr"] *= factor

    # ---------------------------------------------------------------- the response
    def _respond(self, trainer, reason: str, values: dict) -> str | None:
        c, step = self.cfg, trainer.step
        event = Event(step=step, reason=reason, loss=values["loss"], grad_norm=values["grad_norm"], action="")
        found = trainer.ckpt.rollback_target(step - c.suspect_steps)
        if found is None and (reason in FP16_REASONS or reason in SPIKE_REASONS):
            # Nothing old enough to go back to.  fp16: DeepSpeed's skipped steps keep the weights
            # finite (at the minimum scale it raises, and the run saves and exits 4 as without the
            # guard); a spike: the weights are finite.  Say so (once while it lasts) and go on.
            last = self.events[-1] if self.events else None
            if last and last["reason"] == reason and last["action"] == "continued" and \
                    step - last["step"] < c.suspect_steps:
                return None
            event.action = "continued"
            self._record(trainer, event, f"no checkpoint at or before step {step - c.suspect_steps} to roll back "
                                         f"to (guard.suspect_steps={c.suspect_steps}); continuing")
            return None
        if found is None or rollbacks_within(self.events, step, c.rollback_period) >= c.max_rollbacks:
            return self._give_up(trainer, event, found is None)
        self._roll_back(trainer, event, found)
        return "rolled_back"

    def _roll_back(self, trainer, event: Event, found) -> None:
        c, t = self.cfg, trainer.cfg.train
        position = (trainer.epoch, trainer.offset)
        plan = trainer.ckpt.prepare_load(found, trainer.ds_config)
        # Everything but the guard itself: its events and fired faults are what happened since.
        states = {k: v for k, v in trainer._stateful().items() if k != self.key}
        path = trainer.ckpt.load(trainer.engine, plan, states)
        trainer.ckpt.discard_after(trainer.step)
        event.action, event.target_step = "rolled_back", trainer.step
        event.skipped_from, event.skipped_to = (trainer.epoch, trainer.offset), position
        event.skipped_samples = (event.step - trainer.step) * t.global_batch
        trainer.continue_from(*position)   # the batches between the target and the trouble are not replayed
        self.detector.truncate(trainer.step)
        self._skipped = int(trainer.engine.skipped_steps)
        lr_note = ""
        if c.lr_factor != 1.0 and c.lr_factor_steps:
            self.lr_until = trainer.step + c.lr_factor_steps
            self._scale_lr(trainer.engine, c.lr_factor)
            lr_note = f", lr x{c.lr_factor} until step {self.lr_until}"
        n = rollbacks_within(self.events, event.step, c.rollback_period) + 1
        self._record(trainer, event, f"rolled back to step {trainer.step} ({path}), skipping the "
                                     f"{event.skipped_samples} samples of steps {trainer.step + 1}-{event.step} "
                                     f"(data position epoch {position[0]} offset {position[1]}){lr_note}; rollback "
                                     f"{n} of at most {c.max_rollbacks} per {c.rollback_period} steps")

    def _give_up(self, trainer, event: Event, no_target: bool) -> str:
        c, step = self.cfg, trainer.step
        event.action = "gave_up"
        out = trainer.run_dir / "guard"
        diag = trainer.ckpt.save(trainer.engine, trainer._stateful(), into=out)   # outside checkpoints/
        why = (f"no checkpoint at or before step {step - c.suspect_steps} to roll back to" if no_target else
               f"more than guard.max_rollbacks={c.max_rollbacks} rollbacks within guard.rollback_period="
               f"{c.rollback_period} steps")
        self._record(trainer, event, f"giving up: {why}. Diagnostic checkpoint {diag}, report {out / 'report.json'}; "
                                     f"exiting with status {GUARD_EXIT_CODE} (not requeued). Resume from the last "
                                     f"good checkpoint (checkpoints/LATEST) with a lower optim.lr, bf16, or a "
                                     f"higher guard.max_rollbacks")
        if trainer.is_main:
            report = {"step": step, "why": why, "exit_status": GUARD_EXIT_CODE, "diagnostic_checkpoint": str(diag),
                      "events": self.events, "history": self.detector.history(),
                      "skipped_windows": [{k: e[k] for k in ("step", "target_step", "skipped_from", "skipped_to",
                                                              "skipped_samples")}
                                          for e in self.events if e["action"] == "rolled_back"],
                      "guard": c.model_dump() if hasattr(c, "model_dump") else dict(vars(c))}
            atomic_write_text(out / "report.json", json.dumps(report, indent=1))
        return "gave_up"

    def _record(self, trainer, event: Event, what: str) -> None:
        rec = event_record(event)
        self.events.append(rec)
        if trainer.is_main:
            gn = "n/a" if event.grad_norm is None else f"{event.grad_norm:.4g}"
            say_rank0(f"guard: {event.reason} at step {event.step} (loss {event.loss:.4g}, grad norm {gn}): {what}",
                      err=event.action == "gave_up")
            trainer.metrics.write({k: v for k, v in rec.items() if v is not None}, prefix="guard")
