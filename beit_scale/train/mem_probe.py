"""High-water mark of CPU tensor memory, for scaling studies on CPU.

CUDA has ``max_memory_allocated``; the CPU allocator keeps no such counter, and the resident set
is no substitute (glibc keeps freed blocks, the interpreter, DeepSpeed's imports and the data
pipeline all live there).  With ``profile_memory=True`` the torch profiler is told of every CPU
tensor allocation and free, with its size; summing them in time order gives the bytes held by
tensors allocated since the probe started, and its maximum is the CPU analogue of
``max_memory_allocated`` (tensors that existed before the start are not counted; the trainer
starts the probe just before the model is built).

The profiler costs time per operator, so the trainer runs it only for the first
``train.cpu_mem_profile_steps`` steps (the warm-up of a study point: the optimizer state is
created in the first step) and stops it before the measured steps.
"""
from __future__ import annotations

import os

import torch

__all__ = ["CpuTensorHighWater"]


class CpuTensorHighWater:
    def __init__(self) -> None:
        self._prof = None
        self.peak_bytes: int | None = None
        self.final_bytes: int | None = None

    def start(self) -> "CpuTensorHighWater":
        from torch.profiler import ProfilerActivity, profile
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's GPU probing is noise on CPU
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self._prof.__enter__()
        return self

    @property
    def running(self) -> bool:
        return self._prof is not None

    def stop(self) -> int:
        """Stop profiling; return the peak bytes of tensors allocated since start()."""
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        events.sort(key=lambda t: t[0])
        cur = peak = 0
        for _, nbytes in events:
            cur += nbytes
            peak = max(peak, cur)
        self.peak_bytes, self.final_bytes = peak, cur
        return peak
