"""Stopping early: signals (SIGUSR1/SIGTERM -> save and exit for a requeue), the agreement
of all ranks on it, and the exit statuses the launcher and the sbatch scripts read."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from beit_scale.dist.env import REQUEUE_EXIT_CODE  # noqa: F401 - 3: "checkpointed on a signal; please requeue me"

DIVERGED_EXIT_CODE = 4         # "training diverged (fp16 overflow at the minimum loss scale); saved; do not requeue"


class SignalFlag:
    """SIGUSR1/SIGTERM -> finish the step in flight, save, exit REQUEUE_EXIT_CODE."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.name: str | None = None
        self._old = {}

    @classmethod
    def install(cls) -> "SignalFlag":
        flag = cls()
        for sig in cls.SIGNALS:
            flag._old[sig] = signal.signal(sig, flag._handler)
        return flag

    def _handler(self, signum, frame):
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def agree_stop_and_clock(signals: SignalFlag, clock_expired: bool, device) -> tuple[bool, bool]:
    """(stop, save now) on every rank, in one collective and one host sync: stop if any rank got
    a signal (they may reach ranks at different times); save if rank 0's clock says so (the
    caller passes False on other ranks)."""
    flags = torch.tensor([1.0 if signals.name else 0.0, 1.0 if clock_expired else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop, clock = (v > 0 for v in flags.tolist())
    if stop and signals.name is None:
        signals.name = "signal on another rank"
    return stop, clock
