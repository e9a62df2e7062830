#!/bin/bash
# MIM pretraining throughput on a GPU machine: BEiT-Base and -Large, fp16 and bf16, ZeRO 1/2/3,
# activation checkpointing on/off, a few hundred steps each, through the scaling-study harness.
# Prints images/s per GPU, TFLOP/s and MFU against the GPU's dense peak (beit_scale/scaling/peaks.py),
# and the memory model's prediction beside torch.cuda.max_memory_allocated().
#
#   bash benchmarks/gpu_pretrain.sh                 # configs/scaling/gpu_h100.yaml, ~24 points
#   STUDY=configs/scaling/my_grid.yaml OUT=runs/scaling/mine MEASURE=50 bash benchmarks/gpu_pretrain.sh
#
# Re-running continues where it stopped (finished points are skipped). Without a GPU it says so
# and exits 0.
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
: "${STUDY:=configs/scaling/gpu_h100.yaml}"
: "${OUT:=runs/scaling/gpu_pretrain}"

if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != "True" ]; then
    echo "gpu_pretrain.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is not True); nothing to measure."
    echo "On CPU use: python launch/scaling_study.py configs/scaling/cpu_smoke.yaml"
    exit 0
fi
"$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible")'

args=("$STUDY" --out "$OUT" --launcher local)
[ -n "${MEASURE:-}" ] && args+=(--measure "$MEASURE")
[ -n "${WARMUP:-}" ] && args+=(--warmup "$WARMUP")
"$PYTHON" -u launch/scaling_study.py "${args[@]}" || exit $?

echo
echo "== images/s per GPU, TFLOP/s per GPU, MFU, peak memory vs the memory model ($OUT/report.md) =="
grep '^|' "$OUT/report.md"
