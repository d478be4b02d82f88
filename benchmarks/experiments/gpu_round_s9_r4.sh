#!/usr/bin/env bash
# Session 9, GPU round 4 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s9_r4.sh
# With each decode layer's eager form (structures.base.EAGER_FORM: one call into its decode plan, on the N-D input)
# and the eager group products planned on the input's own shape (no reshapes):
#   1. GPU tests: the eager form against float64, Launch once per call, direct launch, decode kernels, siblings;
#   2. host cost of one layer per backend with and without its eager form, blocks (host_costs.py);
#   3. eager HF generate, every model unfused and fused, interleaved over 7 rounds;
#   4. compiled decode step, every structure unfused and fused, beside dense and fused dense.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py tests/test_siblings.py \
  -k "launch or eager_form or (decode_kernels_match_reference_gpu and bfloat16) or fused_siblings"
step host 90 python3 benchmarks/experiments/host_costs.py --out "$OUT/12"
M=dense,dense+fused,lowrank,lowrank+fused,monarch,monarch+fused,blockdiag,blockdiag+fused,nm24,nm24+fused
step eager 120 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-interleaved "$M" --eager-rounds 7
step floor 190 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models "$M" \
  --graph-batches 1 --eager-models "" --generate-models "" --step-compile "$M"
exit 0
