#!/usr/bin/env bash
# Session 9, GPU round 1 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s9_r1.sh
#   1. GPU tests: the direct launch (_launch.Launch) against Triton's, the decode kernels against float64, the
#      bit-for-bit repeats of both one-token forms;
#   2. host cost of eager decode piece by piece (host_costs.py), direct launch on and off;
#   3. eager HF generate, every model unfused and fused, interleaved over 5 rounds (direct launch on).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -m gpu tests/test_inference.py \
  -k "direct_launch or (decode_kernels_match_reference_gpu and not float16) or fused_decode_repeats"
step host 150 python3 benchmarks/experiments/host_costs.py --out "$OUT/12"
M=dense,dense+fused,lowrank,lowrank+fused,monarch,monarch+fused,blockdiag,blockdiag+fused,nm24,nm24+fused
step eager 220 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-interleaved "$M" --eager-rounds 5
exit 0
