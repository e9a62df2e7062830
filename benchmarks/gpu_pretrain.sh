#!/bin/bash
# MIM pretraining throughput on a GPU machine through the scaling-study harness: images/s per GPU,
# TFLOP/s and MFU against the GPU's dense peak (beit_scale/scaling/peaks.py), and the memory model's
# prediction beside torch.cuda.max_memory_allocated().
#
# Default: configs/scaling/gpu_quick.yaml, 4 points (BEiT-Base and -Large, bf16, ZeRO 2 and 3, micro
# batch 128, 5 warm-up + 20 measured steps), sized to finish in under 10 minutes on one H100/H200
# (estimated ~4-6 min including each point's process start; not yet measured on a GPU).
# The full grid, configs/scaling/gpu_h100.yaml (Base/Large x fp16/bf16 x ZeRO 1/2/3 x act ckpt on/off =
# 24 points, 20 warm-up + 200 measured steps each: far longer than 10 minutes), is behind FULL=1:
#
#   bash benchmarks/gpu_pretrain.sh                 # quick grid -> runs/scaling/gpu_quick
#   FULL=1 bash benchmarks/gpu_pretrain.sh          # full grid  -> runs/scaling/gpu_h100
#   STUDY=configs/scaling/my_grid.yaml OUT=runs/scaling/mine MEASURE=50 bash benchmarks/gpu_pretrain.sh
#
# OUT defaults to runs/scaling/<study file name>. Re-running continues where it stopped (finished points
# are skipped). Without a GPU it says so and exits 0. For a check that everything runs at all (fp16/bf16,
# resume, tokenizer, fine-tuning, ZeRO-3), start with bash benchmarks/gpu_smoke.sh.
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${STUDY:-}" ]; then
    if [ "${FULL:-0}" = "1" ]; then STUDY=configs/scaling/gpu_h100.yaml; else STUDY=configs/scaling/gpu_quick.yaml; fi
fi
: "${OUT:=runs/scaling/$(basename "$STUDY" .yaml)}"

if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != "True" ]; then
    echo "gpu_pretrain.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is not True); nothing to measure."
    echo "On CPU use: python launch/scaling_study.py configs/scaling/cpu_smoke.yaml"
    exit 0
fi
"$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible")'
echo "study: $STUDY -> $OUT"

args=("$STUDY" --out "$OUT" --launcher local)
[ -n "${MEASURE:-}" ] && args+=(--measure "$MEASURE")
[ -n "${WARMUP:-}" ] && args+=(--warmup "$WARMUP")
"$PYTHON" -u launch/scaling_study.py "${args[@]}" || exit $?

echo
echo "== images/s per GPU, TFLOP/s per GPU, MFU, peak memory vs the memory model ($OUT/report.md) =="
grep '^|' "$OUT/report.md"
