#!/usr/bin/env bash
# Session 7, GPU round 3 (one H200, nothing carried), issue 12's prefill misses, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s7_r3.sh
# per block linear of the bench model at 8192 tokens under every backend, and the model's prefill per forced backend
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step prefill-layers 240 python3 benchmarks/experiments/prefill_layers.py --out "$OUT/12" --structures "${STRUCTURES:-monarch,lowrank}" --tokens "${TOKENS:-8192}"
exit 0
