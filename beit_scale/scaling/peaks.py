"""Known GPUs: dense peak TFLOP/s per precision and memory size.

Used by the memory model (``--fit``: which micro batch fits which card) and, later, for model
FLOPs utilisation (MFU = achieved FLOP/s / the peak of the precision the run uses).

Figures are vendor datasheet numbers for *dense* math (no 2:4 sparsity), SXM parts unless the
entry says PCIe. ``memory_bytes`` is the card's nominal memory as nvidia-smi reports it in MiB
(what the CUDA allocator can see is a little less; the memory model's fixed overhead covers the
difference together with the CUDA context).

Precision keys: 'fp16', 'bf16' (tensor cores), 'tf32' (tensor cores, fp32 inputs), 'fp32'
(plain CUDA cores). V100 has no bf16 and no tf32: those keys are absent, and asking for them is an
error, because there is no honest peak to divide by.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["GpuSpec", "GPUS", "FIT_GPUS", "get_gpu", "match_gpu", "peak_flops"]

MiB = 2 ** 20


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    tflops: dict = field(default_factory=dict)  # precision -> dense peak TFLOP/s
    # lower-case substrings of torch.cuda.get_device_name() that identify the part
    patterns: tuple = ()

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2 ** 30

    def peak_tflops(self, precision: str) -> float:
        precision = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(
            precision, precision)
        if precision not in self.tflops:
            raise ValueError(f"{self.name} has no {precision} peak (it supports: "
                             f"{', '.join(sorted(self.tflops))}); V100 has no bf16/tf32, use fp16")
        return self.tflops[precision]


GPUS: dict[str, GpuSpec] = {g.name: g for g in [
    GpuSpec("V100-16GB", 16160 * MiB, {"fp16": 125.0, "fp32": 15.7},
            ("v100-sxm2-16gb", "v100-pcie-16gb", "v100-16gb")),
    GpuSpec("V100-32GB", 32510 * MiB, {"fp16": 125.0, "fp32": 15.7},
            ("v100-sxm2-32gb", "v100-pcie-32gb", "v100s", "v100-32gb")),
    GpuSpec("A100-40GB", 40960 * MiB, {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
            ("a100-sxm4-40gb", "a100-pcie-40gb", "a100-40gb")),
    GpuSpec("A100-80GB", 81920 * MiB, {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
            ("a100-sxm4-80gb", "a100 80gb pcie", "a100-pcie-80gb", "a100-80gb")),
    GpuSpec("H100-80GB", 81559 * MiB, {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
            ("h100 80gb hbm3", "h100-sxm", "h100 sxm", "h100-80gb")),
]}

# The cards the memory model's --fit table reports, in column order.
FIT_GPUS = ("V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB")


def get_gpu(name: str) -> GpuSpec:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


def match_gpu(device_name: str, total_memory_bytes: Optional[int] = None) -> Optional[GpuSpec]:
    """Map a ``torch.cuda.get_device_name()`` string to a table entry, or None if unknown.

    Specific patterns ('a100-sxm4-80gb') are tried first. A bare family name ('Tesla V100',
    'NVIDIA A100') is disambiguated by ``total_memory_bytes`` when given
    (``torch.cuda.get_device_properties(0).total_memory``): the entry whose size is nearest.
    """
    s = device_name.lower().strip()
    for spec in GPUS.values():
        if any(p in s for p in spec.patterns):
            return spec
    family = re.search(r"\b(v100|a100|h100)\b", s)
    if not family:
        return None
    candidates = [g for g in GPUS.values() if g.name.lower().startswith(family.group(1))]
    if total_memory_bytes is None:
        # Without a size, the smaller part: an MFU computed against it errs on the high side of
        # nothing (peaks are equal within a family), and a fit check errs on the safe side.
        return min(candidates, key=lambda g: g.memory_bytes)
    return min(candidates, key=lambda g: abs(g.memory_bytes - total_memory_bytes))


def peak_flops(device_name: str, precision: str, total_memory_bytes: Optional[int] = None) -> float:
    """Dense peak FLOP/s (not TFLOP/s) for a device name and precision; ValueError if unknown."""
    spec = match_gpu(device_name, total_memory_bytes)
    if spec is None:
        raise ValueError(f"no peak figures for GPU {device_name!r}; add it to "
                         "beit_scale/scaling/peaks.py:GPUS")
    return spec.peak_tflops(precision) * 1e12
