#!/usr/bin/env bash
# Session 11, GPU round 5 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r5.sh
# Round 4: 2:4 per layer at one token 4.7 / 10.8 / 10.6 us cold (dense 6.1 / 10.6 / 14.0); compiled batch-1 decode
# 1.11x dense unfused, 1.18x fused (target 1.2x). The 2048->8192 rows (1024 values each) are at parity; round 3 had
# 128 values per iteration 8% faster there with row blocks of 8. Here 128 values with row blocks of 2 / 4 / 8 and 2
# warps at one token, and the captured batch-1 step of both 2:4 models with 128 values per iteration for every
# layer beside the default (step_knobs.py). Predicted: 5-10% on the 2048->8192 rows, 2-4% on the step.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 120 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 --tokens 1
step knobs 150 python3 benchmarks/experiments/step_knobs.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --batches 1 --settings '[{}, {"NM_ROW_BLOCK_J": 128}, {"NM_ROW_BLOCK_J": 128, "NM_ROW_BLOCK_M": 8}]'
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
