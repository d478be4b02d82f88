#!/usr/bin/env bash
# Session 10, GPU round 7 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r7.sh
# N:M's expanded-tile kernel now keeps up to 64 tokens in one tile (round 6: 1.6-2.6x faster at 32-64 tokens):
#   1. GPU tests: the decode kernels (bf16, 1-64 tokens) against float64, repeated calls bit for bit;
#   2. the captured decode step of dense and 2:4 (unfused, fused) at batch 1, 8, 32 (decode_floor.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit"
step floor 120 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --graph-batches 1,8,32 --eager-models "" --generate-models ""
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
