#!/usr/bin/env bash
# Session 6, GPU round 1 (one H200, nothing carried), from the repo root:  OUT=$OUT bash benchmarks/experiments/gpu_round_s6_r1.sh
#   14: the 1B-shape sequential offloaded compress on the current code (after the QR-before-SVD fix): peak per stage;
#   12: the inductor-compiled decode step (then captured) at batch 1 for dense and every structure, in one process
#       (the compiled-step rows for low-rank, Monarch and 2:4 were never measured), plus the captured eager step.
set -u
: "${OUT:?set OUT}"
mkdir -p "$OUT/14" "$OUT/12"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.log" 2>&1
t=$(date +%s)
timeout 130 python3 benchmarks/compress_gpu.py --work /tmp/w1b --stages llama1b --timeouts llama1b=110 \
  --out "$OUT/14" > "$OUT/14/llama1b.log" 2>&1
echo "llama1b rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"; t=$(date +%s)
timeout "${T12:-170}" python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,blockdiag,lowrank,monarch,nm24 --graph-batches 1 --eager-models "" --generate-models "" \
  --step-compile dense,blockdiag,lowrank,monarch,nm24 > "$OUT/12/floor.log" 2>&1
echo "floor rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"
exit 0
