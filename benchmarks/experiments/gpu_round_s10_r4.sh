#!/usr/bin/env bash
# Session 10, GPU round 4 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r4.sh
# The two-stage decode kernels above one token (low-rank, Monarch): every second-stage row block re-reads the first
# stage's fp32 partials for all its tokens. Here:
#   1. GPU tests: repeated calls bit for bit (N:M's split reduction among them), direct launches;
#   2. low-rank and Monarch per layer at 2, 8, 16 tokens with the first stage's splits capped / taller second-stage
#      row blocks (decode_layers.py MULTI_VARIANTS);
#   3. the captured decode step at batch 1 and 8 of dense, low-rank and Monarch, unfused and fused (decode_floor.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 120 python3 -m pytest -q -x -m gpu tests/test_inference.py -k "repeats_bit_for_bit or direct_launch"
step layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank,monarch \
  --tokens 2,8,16
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,lowrank,lowrank+fused,monarch,monarch+fused --graph-batches 1,8 --eager-models "" --generate-models ""
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
