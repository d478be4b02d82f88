#!/usr/bin/env bash
# Session 8, GPU round 4 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s8_r4.sh
# With the PDL pair the default on Hopper (and Monarch taking it at every size):
#   1. the GPU tests of the decode kernels (both one-token forms repeated bit for bit) and of fused siblings
#      (1-64 tokens and 300, eager and graphs);
#   2. per-group cost of every structure (decode_groups.py);
#   3. the decode step of the two-stage structures, unfused and fused, beside dense and fused dense, captured and
#      inductor-compiled, in one process.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 200 python3 -m pytest -q -m gpu tests/test_siblings.py tests/test_inference.py \
  -k "fused_siblings or (decode_kernels_match_reference_gpu and not float16) or fused_decode_repeats"
step groups 60 python3 benchmarks/experiments/decode_groups.py --out "$OUT/12" --variants base
M=dense,dense+fused,lowrank,lowrank+fused,monarch,monarch+fused  # (block-diagonal and 2:4: no two-stage product)
step floor 130 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models "$M" \
  --graph-batches 1 --eager-models "" --generate-models "" --step-compile "$M"
exit 0
