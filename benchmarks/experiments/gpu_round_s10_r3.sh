#!/usr/bin/env bash
# Session 10, GPU round 3 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r3.sh
# Round 2: the 2:4 form of the expanded-tile kernel at 0.36-0.57x dense at 8 tokens (from 0.1-0.2x): 128 programs at
# 2048 rows, each a long latency-bound reduction. Here the reduction split over programs (the last split of a tile
# sums the fp32 partials), gated-input products in taller row blocks:
#   1. GPU tests of the decode kernels (bf16) against float64;
#   2. 2:4 per layer at 1-64 tokens, the kernel's variants beside the gather kernel and dense (decode_layers.py);
#   3. the captured decode step at batch 1, 8, 32 of dense and 2:4, unfused and fused (decode_floor.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py -k "decode_kernels_match_reference_gpu and bfloat16"
step nm-layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 \
  --tokens 1,2,4,8,16,64
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --graph-batches 1,8,32 --eager-models "" --generate-models ""
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
