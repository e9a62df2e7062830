"""Known GPUs: dense peak TFLOP/s per precision and memory size.

Used by the memory model (``--fit``: which micro batch fits which card) and for model FLOPs
utilisation (MFU = achieved FLOP/s / the peak of the precision the run uses).

Figures are NVIDIA datasheet numbers for *dense* math: the datasheets print the tensor-core
figures with 2:4 structured sparsity (marked ``*``), which is twice what a dense matmul can reach;
this table holds half of those. ``memory_bytes`` is the card's memory as nvidia-smi reports it in
MiB (what the CUDA allocator can see is a little less; the memory model's fixed overhead covers
the difference together with the CUDA context).

Precision keys: 'fp16', 'bf16' (tensor cores), 'tf32' (tensor cores, fp32 inputs), 'fp32'
(plain CUDA cores). V100 has no bf16 and no tf32: those keys are absent, and asking for them is an
error, because there is no honest peak to divide by.

Identifying the card: form factors of one chip differ in clocks and power, so in peak
(H100 SXM 989 vs PCIe 756 vs NVL 835 bf16 TFLOP/s; V100 SXM2 125 vs PCIe 112 fp16), and one
form factor comes in several memory sizes. ``identify_gpu`` therefore reads the device name as
*tokens* (never substrings: 'A10' is not 'A100', 'L4' is not 'L40S', 'H200' is not 'H200 NVL'),
takes the form factor from the name, and uses the memory size (``total_memory`` of
``torch.cuda.get_device_properties``, or a size in the name such as '80GB') to pick between
entries the name alone leaves open, e.g. 'NVIDIA H100' with 94 GB is the NVL part. When the
name and memory do not single out one set of peaks it returns no entry and a reason, never a
guess; ``gpu_peak``/``cuda_peak`` return ``(None, reason)`` for the caller to log once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["GpuSpec", "GpuMatch", "GPUS", "FIT_GPUS", "get_gpu", "identify_gpu", "match_gpu",
           "gpu_peak", "cuda_peak", "peak_flops", "MEMORY_TOLERANCE"]

MiB = 2 ** 20
GiB = 2 ** 30

# A measured total_memory matches an entry when within this fraction of its nvidia-smi size:
# torch reports a few hundred MiB less than nvidia-smi, and ECC on GDDR cards (A10, L40S, ...)
# takes ~6 %. The sizes the table has to tell apart differ by >= 15 % (80/94, 40/80, 16/32).
MEMORY_TOLERANCE = 0.12

_PRECISION_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
                      "float": "fp32"}


@dataclass(frozen=True)
class GpuSpec:
    name: str                  # table key, e.g. "H100-80GB"
    memory_bytes: int          # nvidia-smi's total (MiB x 2**20)
    tflops: dict = field(default_factory=dict)  # precision -> dense peak TFLOP/s
    family: str = ""           # first token of the normalized device name: "h100", "v100s", "l40s"
    forms: tuple = ()          # name tokens that mark this form factor: ("pcie",), ("nvl",)
    bare: bool = False         # the device name without any form token is this part
    nominal_gb: int = 0        # marketing size, matched against a "<N>gb" token in the name
    form: str = ""             # human-readable form factor, for messages
    source: str = ""           # where the figures come from

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2 ** 30

    def peak_tflops(self, precision: str) -> float:
        precision = _PRECISION_ALIASES.get(precision, precision)
        if precision not in self.tflops:
            raise ValueError(f"{self.name} has no {precision} peak (it supports: "
                             f"{', '.join(sorted(self.tflops))}); V100 has no bf16/tf32, use fp16")
        return self.tflops[precision]

    def describe(self) -> str:
        return f"{self.name} ({self.form}, {self.nominal_gb} GB)"


def _tc(half: float, tf32: Optional[float], fp32: float) -> dict:
    """Dense tensor-core fp16/bf16 and tf32, and CUDA-core fp32, TFLOP/s."""
    d = {"fp16": half, "fp32": fp32}
    if tf32 is not None:
        d.update(bf16=half, tf32=tf32)
    return d


_VOLTA = "NVIDIA V100 / V100S datasheets (no sparsity on Volta)"
_AMPERE = "NVIDIA A100 datasheet (tensor figures: the sparse '*' values / 2)"
_HOPPER = ("NVIDIA H100 whitepaper / H100, H200 datasheets (tensor figures: the sparse '*' values / 2; "
           "H200 is the same GH100 at the same clocks as H100 SXM)")

# Table order matters only for match_gpu's memory-only fallback (first = preferred) and messages.
GPUS: dict[str, GpuSpec] = {g.name: g for g in [
    # --- Volta (no bf16, no tf32)
    GpuSpec("V100-16GB", 16160 * MiB, {"fp16": 125.0, "fp32": 15.7}, "v100", ("sxm2",),
            nominal_gb=16, form="SXM2", source=_VOLTA),
    GpuSpec("V100-32GB", 32510 * MiB, {"fp16": 125.0, "fp32": 15.7}, "v100", ("sxm2",),
            nominal_gb=32, form="SXM2", source=_VOLTA),
    GpuSpec("V100-PCIe-16GB", 16160 * MiB, {"fp16": 112.0, "fp32": 14.0}, "v100", ("pcie",),
            nominal_gb=16, form="PCIe", source=_VOLTA),
    GpuSpec("V100-PCIe-32GB", 32510 * MiB, {"fp16": 112.0, "fp32": 14.0}, "v100", ("pcie",),
            nominal_gb=32, form="PCIe", source=_VOLTA),
    GpuSpec("V100S-PCIe-32GB", 32510 * MiB, {"fp16": 130.0, "fp32": 16.4}, "v100s", ("pcie",),
            bare=True, nominal_gb=32, form="PCIe", source=_VOLTA),
    # --- Ampere. A100 SXM4 and PCIe have the same datasheet peaks, so one entry per size serves both.
    GpuSpec("A100-40GB", 40960 * MiB, _tc(312.0, 156.0, 19.5), "a100", ("sxm4", "pcie"), bare=True,
            nominal_gb=40, form="SXM4/PCIe", source=_AMPERE),
    GpuSpec("A100-80GB", 81920 * MiB, _tc(312.0, 156.0, 19.5), "a100", ("sxm4", "pcie"), bare=True,
            nominal_gb=80, form="SXM4/PCIe", source=_AMPERE),
    GpuSpec("A10-24GB", 23028 * MiB, _tc(125.0, 62.5, 31.2), "a10", (), bare=True,
            nominal_gb=24, form="PCIe", source="NVIDIA A10 datasheet (sparse '*' / 2)"),
    GpuSpec("A30-24GB", 24576 * MiB, _tc(165.0, 82.0, 10.3), "a30", (), bare=True,
            nominal_gb=24, form="PCIe", source="NVIDIA A30 datasheet (sparse '*' / 2)"),
    GpuSpec("A40-48GB", 46068 * MiB, _tc(149.7, 74.8, 37.4), "a40", (), bare=True,
            nominal_gb=48, form="PCIe", source="NVIDIA A40 datasheet (sparse '*' / 2)"),
    # --- Ada
    GpuSpec("L4-24GB", 23034 * MiB, _tc(121.0, 60.0, 30.3), "l4", (), bare=True,
            nominal_gb=24, form="PCIe", source="NVIDIA L4 datasheet (sparse '*' / 2)"),
    GpuSpec("L40-48GB", 46068 * MiB, _tc(181.05, 90.5, 90.5), "l40", (), bare=True,
            nominal_gb=48, form="PCIe", source="NVIDIA L40 datasheet (sparse '*' / 2)"),
    GpuSpec("L40S-48GB", 46068 * MiB, _tc(362.05, 183.0, 91.6), "l40s", (), bare=True,
            nominal_gb=48, form="PCIe", source="NVIDIA L40S datasheet (sparse '*' / 2)"),
    # --- Hopper. Driver names: "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
    # "NVIDIA H200" (SXM), "NVIDIA H200 NVL".
    GpuSpec("H100-80GB", 81559 * MiB, _tc(989.4, 494.7, 66.9), "h100", ("sxm", "sxm5", "hbm3"),
            nominal_gb=80, form="SXM5", source=_HOPPER),
    GpuSpec("H100-PCIe-80GB", 81559 * MiB, _tc(756.5, 378.0, 51.0), "h100", ("pcie",),
            nominal_gb=80, form="PCIe", source=_HOPPER),
    GpuSpec("H100-NVL-94GB", 95830 * MiB, _tc(835.5, 417.5, 60.0), "h100", ("nvl",),
            nominal_gb=94, form="NVL", source=_HOPPER),
    GpuSpec("H200-141GB", 143771 * MiB, _tc(989.4, 494.7, 66.9), "h200", ("sxm", "sxm5"), bare=True,
            nominal_gb=141, form="SXM5", source=_HOPPER),
    GpuSpec("H200-NVL-141GB", 143771 * MiB, _tc(835.5, 417.5, 60.0), "h200", ("nvl",),
            nominal_gb=141, form="NVL", source=_HOPPER),
]}

# The cards the memory model's --fit table reports, in column order.
FIT_GPUS = ("V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB")

# Leading words of device names that say nothing about the part.
_VENDOR_WORDS = ("nvidia", "tesla")


def get_gpu(name: str) -> GpuSpec:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class GpuMatch:
    """What ``identify_gpu`` made of a device: ``spec`` is the entry whose peaks apply (None when
    the device is unknown or the name and memory leave several peaks possible); ``candidates``
    are the entries still possible after every filter; ``reason`` says how it matched or why not."""
    device_name: str
    total_memory_bytes: Optional[int]
    spec: Optional[GpuSpec]
    candidates: tuple
    reason: str

    def __bool__(self) -> bool:
        return self.spec is not None


def _tokens(device_name: str) -> list[str]:
    toks = re.split(r"[\s\-_/,]+", device_name.lower().strip())
    toks = [t for t in toks if t]
    while toks and toks[0] in _VENDOR_WORDS:
        toks.pop(0)
    return toks


def _memory_ok(spec: GpuSpec, total: int) -> bool:
    return abs(total - spec.memory_bytes) <= MEMORY_TOLERANCE * spec.memory_bytes


def _same_peaks(specs) -> bool:
    return len({tuple(sorted(s.tflops.items())) for s in specs}) == 1


def identify_gpu(device_name: str, total_memory_bytes: Optional[int] = None) -> GpuMatch:
    """Find the table entry of a device from its name and (optionally) its memory size.

    ``device_name``: ``torch.cuda.get_device_name(i)`` / ``get_device_properties(i).name``;
    ``total_memory_bytes``: ``get_device_properties(i).total_memory``. Steps: the family is the
    first word of the name after 'NVIDIA'/'Tesla' ('a100', 'h100', 'v100s'), compared whole; a
    form-factor word ('pcie', 'nvl', 'sxm2', 'hbm3') narrows it; a part whose name has no such
    word (``bare``: 'NVIDIA H200' is the SXM part) is taken when none is there; a '<N>gb' word
    and the measured memory must agree with the entry's size. One entry left, or several with
    the same peaks: a match. Otherwise no entry, and ``reason`` says why.
    """
    def done(spec, cands, reason):
        return GpuMatch(device_name, total_memory_bytes, spec, tuple(cands), reason)

    toks = _tokens(device_name)
    if not toks:
        return done(None, (), f"empty GPU name {device_name!r}")
    if "mig" in toks:
        return done(None, (), f"{device_name!r} is a MIG slice: it has a fraction of the card's SMs, so "
                              "the whole card's peak would understate MFU; no peak is used")
    family = toks[0]
    cands = [g for g in GPUS.values() if g.family == family]
    if not cands:
        return done(None, (), f"GPU {device_name!r} is not in the peak table (families: "
                              f"{', '.join(sorted({g.family for g in GPUS.values()}))}); add its "
                              "datasheet dense figures to beit_scale/scaling/peaks.py:GPUS")
    how = [f"family {family!r}"]

    form_words = set(toks[1:]) & {f for g in cands for f in g.forms}
    if form_words:
        cands = [g for g in cands if form_words & set(g.forms)]
        how.append(f"form {'/'.join(sorted(form_words))}")
    elif any(g.bare for g in cands):
        cands = [g for g in cands if g.bare]
        how.append("no form word in the name: " + "/".join(sorted({g.form for g in cands})))

    sizes = [int(m.group(1)) for t in toks[1:] for m in [re.fullmatch(r"(\d+)gb?", t)] if m]
    if sizes:
        before = cands
        cands = [g for g in cands if g.nominal_gb in sizes]
        if not cands:
            return done(None, (), f"{device_name!r}: the name says {sizes[0]} GB but the table's "
                                  f"{family} entries are " + ", ".join(g.describe() for g in before))
        how.append(f"{sizes[0]} GB in the name")

    if total_memory_bytes is not None:
        before = cands
        cands = [g for g in cands if _memory_ok(g, total_memory_bytes)]
        if cands:  # of several sizes within the tolerance, the nearest (80 vs 94 GB)
            best = min(abs(g.memory_bytes - total_memory_bytes) for g in cands)
            cands = [g for g in cands if abs(g.memory_bytes - total_memory_bytes) == best]
        if not cands:
            return done(None, (), f"{device_name!r} with {total_memory_bytes / GiB:.1f} GiB matches no entry "
                                  "within {:.0%}: ".format(MEMORY_TOLERANCE)
                                  + ", ".join(f"{g.name} {g.memory_gib:.1f} GiB" for g in before))
        how.append(f"{total_memory_bytes / GiB:.1f} GiB")

    if len(cands) == 1 or _same_peaks(cands):
        spec = cands[0]
        note = "" if len(cands) == 1 else f" (also {', '.join(g.name for g in cands[1:])}: same peaks)"
        return done(spec, cands, f"{device_name!r} -> {spec.name} [{'; '.join(how)}]{note}")
    return done(None, cands, (
        f"{device_name!r}" + (f" with {total_memory_bytes / GiB:.1f} GiB" if total_memory_bytes else "")
        + " could be " + " or ".join(f"{g.describe()}: {_fmt_peaks(g)}" for g in cands)
        + "; the name and memory size do not tell them apart, so no peak is used"
        + ("" if total_memory_bytes else " (pass the device's total_memory)")))


def _fmt_peaks(g: GpuSpec) -> str:
    key = "bf16" if "bf16" in g.tflops else "fp16"
    return f"{key} {g.tflops[key]:g} TFLOP/s"


def match_gpu(device_name: str, total_memory_bytes: Optional[int] = None) -> Optional[GpuSpec]:
    """The table entry for a device, for *memory* purposes; None if its family is unknown.

    Like ``identify_gpu``, and when the name and memory leave several form factors with different
    peaks (a bare 'Tesla V100' of 32 GB: SXM2 or PCIe), the first of them in table order, whose
    memory size is the right one. Without a memory size, of several sizes the smallest (a fit
    check then errs on the safe side). For peaks and MFU use ``gpu_peak``/``identify_gpu``,
    which refuse to choose.
    """
    m = identify_gpu(device_name, total_memory_bytes)
    if m.spec is not None:
        return min(m.candidates, key=lambda g: g.memory_bytes) if total_memory_bytes is None else m.spec
    if not m.candidates:
        return None
    return min(m.candidates, key=lambda g: g.memory_bytes) if total_memory_bytes is None else m.candidates[0]


def gpu_peak(device_name: str, precision: str,
             total_memory_bytes: Optional[int] = None) -> tuple[Optional[float], str]:
    """(dense peak FLOP/s, reason) for a device and precision, or (None, why not): unknown
    device, ambiguous name/memory, MIG slice, or a precision the part has no peak for."""
    m = identify_gpu(device_name, total_memory_bytes)
    if m.spec is None:
        return None, m.reason
    try:
        return m.spec.peak_tflops(precision) * 1e12, m.reason
    except ValueError as e:
        return None, str(e)


def cuda_peak(precision: str, device: int = 0) -> tuple[Optional[float], str]:
    """``gpu_peak`` for a visible CUDA device (name and memory from torch); (None, reason) without one."""
    import torch
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    p = torch.cuda.get_device_properties(device)
    return gpu_peak(p.name, precision, p.total_memory)


def peak_flops(device_name: str, precision: str, total_memory_bytes: Optional[int] = None) -> float:
    """Dense peak FLOP/s (not TFLOP/s) for a device name and precision; ValueError with the
    reason when the device is unknown or ambiguous or has no peak for that precision."""
    flops, reason = gpu_peak(device_name, precision, total_memory_bytes)
    if flops is None:
        raise ValueError(f"no peak for {precision} on GPU {device_name!r}: {reason}")
    return flops
