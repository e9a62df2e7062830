"""beit_scale.scaling.peaks: device name + memory size -> dense datasheet peaks, or None and why.

No GPU needed: device properties are mocked with what torch.cuda.get_device_properties reports
(``name``, ``total_memory`` in bytes, which is a little less than nvidia-smi's total).
"""
from types import SimpleNamespace

import pytest

from beit_scale.scaling import peaks
from beit_scale.scaling.peaks import (FIT_GPUS, GPUS, cuda_peak, gpu_peak, identify_gpu, match_gpu,
                                      peak_flops)

GB = 10 ** 9
GiB = 2 ** 30

# (torch device name, torch total_memory, table entry, dense fp16 TFLOP/s, dense tf32 TFLOP/s or None)
# Figures: NVIDIA datasheets, tensor-core values without sparsity (the '*' values / 2).
DEVICES = [
    ("Tesla V100-SXM2-16GB", 16_945_512_448, "V100-16GB", 125.0, None),
    ("Tesla V100-SXM2-32GB", 34_089_730_048, "V100-32GB", 125.0, None),
    ("Tesla V100-PCIE-16GB", 16_945_512_448, "V100-PCIe-16GB", 112.0, None),
    ("Tesla V100-PCIE-32GB", 34_058_272_768, "V100-PCIe-32GB", 112.0, None),
    ("Tesla V100S-PCIE-32GB", 34_089_730_048, "V100S-PCIe-32GB", 130.0, None),
    ("NVIDIA A100-SXM4-40GB", 42_505_273_344, "A100-40GB", 312.0, 156.0),
    ("NVIDIA A100-PCIE-40GB", 42_505_273_344, "A100-40GB", 312.0, 156.0),
    ("NVIDIA A100-SXM4-80GB", 85_198_045_184, "A100-80GB", 312.0, 156.0),
    ("NVIDIA A100 80GB PCIe", 85_097_971_712, "A100-80GB", 312.0, 156.0),
    ("NVIDIA A10", 23_673_700_352, "A10-24GB", 125.0, 62.5),
    ("NVIDIA A30", 25_393_692_672, "A30-24GB", 165.0, 82.0),
    ("NVIDIA A40", 47_697_362_944, "A40-48GB", 149.7, 74.8),
    ("NVIDIA L4", 23_580_639_232, "L4-24GB", 121.0, 60.0),
    ("NVIDIA L40", 47_697_362_944, "L40-48GB", 181.05, 90.5),
    ("NVIDIA L40S", 47_697_362_944, "L40S-48GB", 362.05, 183.0),
    ("NVIDIA H100 80GB HBM3", 85_045_100_544, "H100-80GB", 989.4, 494.7),      # SXM5
    ("NVIDIA H100 PCIe", 85_045_100_544, "H100-PCIe-80GB", 756.5, 378.0),
    ("NVIDIA H100 NVL", 99_961_274_368, "H100-NVL-94GB", 835.5, 417.5),
    ("NVIDIA H200", 150_110_011_392, "H200-141GB", 989.4, 494.7),              # SXM5
    ("NVIDIA H200 NVL", 150_110_011_392, "H200-NVL-141GB", 835.5, 417.5),
]


def props(name, total_memory):
    return SimpleNamespace(name=name, total_memory=total_memory, multi_processor_count=0)


@pytest.mark.parametrize("name, total, entry, half, tf32", DEVICES, ids=[d[0] for d in DEVICES])
def test_each_listed_device_resolves_to_its_datasheet_figures(name, total, entry, half, tf32):
    m = identify_gpu(name, total)
    assert m.spec is not None and m.spec.name == entry, m.reason
    assert entry in m.reason
    assert peak_flops(name, "fp16", total) == half * 1e12
    if tf32 is None:  # Volta: no bf16, no tf32
        for prec in ("bf16", "tf32"):
            flops, reason = gpu_peak(name, prec, total)
            assert flops is None and f"no {prec}" in reason
    else:
        assert peak_flops(name, "bf16", total) == half * 1e12
        assert gpu_peak(name, "bfloat16", total)[0] == half * 1e12      # torch dtype names too
        assert peak_flops(name, "tf32", total) == tf32 * 1e12
    assert peak_flops(name, "fp32", total) <= (tf32 or half) * 1e12    # CUDA cores: at most tensor cores
    # the name alone is enough for every real driver name listed here
    assert identify_gpu(name).spec.name == entry


def test_dense_not_sparse():
    # The datasheets' headline H100/H200 SXM figure is 1979 TFLOP/s bf16 *with sparsity*.
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(1979e12 / 2, rel=1e-3)
    assert peak_flops("NVIDIA H200", "bf16") == peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak_flops("NVIDIA L40S", "bf16") == pytest.approx(733e12 / 2, rel=0.02)


def test_names_are_matched_as_words_not_substrings():
    # 'a10' is a substring of 'a100', 'l4' of 'l40s', 'h200' of 'h200 nvl'
    assert identify_gpu("NVIDIA A10").spec.name == "A10-24GB"
    assert identify_gpu("NVIDIA A100-SXM4-40GB").spec.name == "A100-40GB"
    assert identify_gpu("NVIDIA L4").spec.name == "L4-24GB"
    assert identify_gpu("NVIDIA L40S").spec.name == "L40S-48GB"
    assert identify_gpu("NVIDIA H200").spec.name == "H200-141GB"
    assert identify_gpu("NVIDIA H200 NVL").spec.name == "H200-NVL-141GB"
    assert identify_gpu("nvidia  h100_pcie").spec.name == "H100-PCIe-80GB"   # case, separators


@pytest.mark.parametrize("name, total, entry", [
    # a family name without a form factor: the memory size picks the part
    ("NVIDIA H100", 99_961_274_368, "H100-NVL-94GB"),
    ("NVIDIA H100", 94 * GB, "H100-NVL-94GB"),
    # a form factor without a size: the memory size picks the entry
    ("Tesla V100-SXM2", 16_945_512_448, "V100-16GB"),
    ("Tesla V100-SXM2", 34_089_730_048, "V100-32GB"),
    ("Tesla V100-PCIE", 34_089_730_048, "V100-PCIe-32GB"),
    ("NVIDIA A100-SXM4", 85_198_045_184, "A100-80GB"),
    ("NVIDIA A100-PCIE", 42_505_273_344, "A100-40GB"),
    # ECC on a GDDR card takes ~6 %: still the same card
    ("NVIDIA L40S", 48 * GiB, "L40S-48GB"),
])
def test_ambiguous_names_are_resolved_by_memory(name, total, entry):
    m = identify_gpu(name, total)
    assert m.spec is not None and m.spec.name == entry, m.reason
    assert "GiB" in m.reason


def test_ambiguous_name_that_memory_cannot_resolve_gives_none_and_says_why():
    # H100 SXM5 and PCIe both have 80 GB but differ in peak (989 vs 756): no guess
    m = identify_gpu("NVIDIA H100", 85_045_100_544)
    assert m.spec is None and {g.name for g in m.candidates} == {"H100-80GB", "H100-PCIe-80GB"}
    assert "989.4" in m.reason and "756.5" in m.reason and "no peak" in m.reason
    flops, reason = gpu_peak("NVIDIA H100", "bf16", 85_045_100_544)
    assert flops is None and reason == m.reason
    with pytest.raises(ValueError, match="could be H100-80GB"):
        peak_flops("NVIDIA H100", "bf16", 85_045_100_544)
    # a V100 without its form factor: SXM2 125 or PCIe 112
    assert identify_gpu("Tesla V100", 34_089_730_048).spec is None
    # no memory given where only memory would tell: the reason says to pass it
    assert "total_memory" in identify_gpu("NVIDIA H100").reason
    # parts of one family and size with the same peaks are no ambiguity (A100 SXM4/PCIe)
    assert identify_gpu("NVIDIA A100", 42_505_273_344).spec.name == "A100-40GB"


@pytest.mark.parametrize("name, total, why", [
    ("NVIDIA GeForce RTX 3090", 25_447_170_048, "not in the peak table"),
    ("NVIDIA B200", 191 * GB, "not in the peak table"),
    ("AMD Instinct MI300X", 192 * GB, "not in the peak table"),
    ("", None, "empty GPU name"),
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 20 * GiB, "MIG slice"),
    ("NVIDIA H100 64GB HBM3", 64 * GiB, "the name says 64 GB"),
    ("NVIDIA A10", 80 * GiB, "matches no entry"),                     # memory contradicts the name
    ("NVIDIA H200", 80 * GiB, "matches no entry"),
])
def test_unknown_device_gives_none_with_a_reason(name, total, why):
    m = identify_gpu(name, total)
    assert m.spec is None and not m and why in m.reason
    flops, reason = gpu_peak(name, "bf16", total)
    assert flops is None and why in reason
    with pytest.raises(ValueError, match="no peak for bf16"):
        peak_flops(name, "bf16", total)


def test_cuda_peak_reads_the_device_properties(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props("NVIDIA H200", 150_110_011_392))
    flops, reason = cuda_peak("bf16")
    assert flops == 989.4e12 and "H200-141GB" in reason
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props("NVIDIA H100", 85_045_100_544))
    flops, reason = cuda_peak("bf16")
    assert flops is None and "could be" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_peak("bf16") == (None, "no CUDA device")


def test_legacy_match_gpu_for_the_memory_model():
    """match_gpu picks a table entry for memory purposes even where peaks are ambiguous."""
    assert match_gpu("Tesla V100", total_memory_bytes=32 * GiB).name == "V100-32GB"
    assert match_gpu("NVIDIA A100-SXM4-80GB").name == "A100-80GB"
    assert match_gpu("NVIDIA A100").name == "A100-40GB"          # no size: the smaller card
    assert match_gpu("NVIDIA H200", 150_110_011_392).name == "H200-141GB"
    assert match_gpu("NVIDIA GeForce RTX 3090") is None
    assert all(name in GPUS for name in FIT_GPUS)


def test_table_is_consistent():
    for g in GPUS.values():
        assert g.family and g.nominal_gb and g.form and g.source, g
        assert abs(g.memory_bytes / GB - g.nominal_gb) / g.nominal_gb < 0.12, g   # nvidia-smi vs marketing
        assert set(g.tflops) in ({"fp16", "fp32"}, {"fp16", "bf16", "tf32", "fp32"}), g
        assert g.tflops["fp16"] > g.tflops["fp32"]
        if "bf16" in g.tflops:
            assert g.tflops["bf16"] == g.tflops["fp16"] and g.tflops["tf32"] <= g.tflops["fp16"] / 2 * 1.02
    # every family has at most one part named without a form word
    fams = {}
    for g in GPUS.values():
        fams.setdefault(g.family, []).append(g)
    for fam, gs in fams.items():
        bare = [g for g in gs if g.bare]
        assert len({tuple(sorted(g.tflops.items())) for g in bare}) <= 1, fam


# ---- the MFU caller: the scaling study's device peak --------------------------------------------
def test_study_device_peak_on_a_known_gpu(monkeypatch, tmp_path, capsys):
    import torch
    from beit_scale.scaling import study
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props("NVIDIA H200", 150_110_011_392))
    dev = study.device_peak(tmp_path)
    assert dev["kind"] == "cuda" and dev["table"] == "H200-141GB" and dev["peak_tflops"]["bf16"] == 989.4
    assert "no datasheet peak" not in capsys.readouterr().err
    row = {"tflops_per_device": 98.94, "precision_effective": "bf16"}
    study._mfu(row, study.Point("beit_debug", 2, False, 2, "bf16", 8), dev)
    assert row["mfu"] == pytest.approx(0.1)


def test_study_device_peak_on_an_unknown_gpu_logs_once_and_reports_no_mfu(monkeypatch, tmp_path, capsys):
    import torch
    from beit_scale.scaling import study
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=0: props("NVIDIA GeForce RTX 3090", 25_447_170_048))
    dev = study.device_peak(tmp_path)
    assert dev["table"] is None and dev["peak_tflops"] == {} and "not in the peak table" in dev["peak_reason"]
    err = capsys.readouterr().err
    assert err.count("no datasheet peak") == 1 and "RTX 3090" in err
    assert study.device_peak(tmp_path) == dev                 # cached: said once per study
    assert "no datasheet peak" not in capsys.readouterr().err
    row = {"tflops_per_device": 50.0, "precision_effective": "bf16"}
    study._mfu(row, study.Point("beit_debug", 2, False, 2, "bf16", 1), dev)
    assert "mfu" not in row                                   # no number rather than a guessed one
    report = study._report(tmp_path, [], dev, None, {}).read_text()
    assert "No datasheet peak for this device, so no MFU" in report and "not in the peak table" in report


def test_module_needs_no_torch():
    import subprocess
    import sys
    code = ("import sys; import beit_scale.scaling.peaks as p; "
            "assert p.peak_flops('NVIDIA H200', 'bf16') > 0; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=peaks.__file__.rsplit("/beit_scale/", 1)[0])
