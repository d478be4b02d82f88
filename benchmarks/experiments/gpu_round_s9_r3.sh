#!/usr/bin/env bash
# Session 9, GPU round 3 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s9_r3.sh
# After the two fixes of round 2's regressions (fused siblings re-planned every eager call; a Launch made inside a
# capture put its kernel twice into the graph):
#   1. GPU tests: a Launch launches once per call, direct launch, decode kernels (gated input) vs float64, siblings;
#   2. host cost of eager decode piece by piece (host_costs.py);
#   3. compiled decode step, every structure unfused and fused (gated MLP), beside dense and fused dense;
#   4. eager HF generate, every model unfused and fused, interleaved over 5 rounds.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py tests/test_siblings.py \
  -k "launch or (decode_kernels_match_reference_gpu and bfloat16) or fused_siblings"
step host 60 python3 benchmarks/experiments/host_costs.py --out "$OUT/12"
M=dense,dense+fused,lowrank,lowrank+fused,monarch,monarch+fused,blockdiag,blockdiag+fused,nm24,nm24+fused
step floor 230 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models "$M" \
  --graph-batches 1 --eager-models "" --generate-models "" --step-compile "$M"
step eager 110 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-interleaved "$M" --eager-rounds 5
exit 0
