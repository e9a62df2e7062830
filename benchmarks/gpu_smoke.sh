#!/bin/bash
# GPU smoke test: environment (device, sm_XY in the wheel, versions, bf16/fp16), SDPA with BEiT's float
# relative-position bias (kernel choice, errors vs fp32 math), beit_base MIM under ZeRO-2 in fp16 and bf16
# (losses, skipped steps, loss scale, img/s, TFLOP/s, MFU, peak memory vs the memory model), resume from a
# checkpoint, the tokenizer stage in fp16, fine-tuning with EMA from the MIM run, and ZeRO-3 with activation
# checkpointing. One Python process (benchmarks/gpu_smoke.py) runs all checks; ~3-5 min on one H100/H200,
# well under 8. Prints a table and writes it as JSON (runs/gpu_smoke/smoke.json).
#
#   bash benchmarks/gpu_smoke.sh                          # all checks
#   bash benchmarks/gpu_smoke.sh --only env,sdpa,mim      # some of them
#   bash benchmarks/gpu_smoke.sh --steps 60 --keep --out runs/gpu_smoke/long.json
#   bash benchmarks/gpu_smoke.sh --help
#
# Exit status 0: all ok; 1: a check failed; 2: bad arguments. Without a GPU it says so, writes a JSON
# saying "skipped" and exits 0 without training. Relative paths are taken from the repository root.
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -u benchmarks/gpu_smoke.py "$@"
