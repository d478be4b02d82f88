#!/usr/bin/env bash
# Session 8, GPU round 1 (one H200, nothing carried), issue 12: q/k/v and gate/up fused (structmat.fuse_siblings),
# from the repo root:  OUT=$OUT bash benchmarks/experiments/gpu_round_s8_r1.sh
#   1. the GPU tests of the fused group products and of the decode kernels whose plans now take stacked operands;
#   2. the decode step of the bench-infer model, one process: each structure unfused and fused, dense and dense with
#      its q/k/v and gate/up as one GEMM each (the fair baseline for fusion), captured eager step and the step
#      compiled by inductor then captured, and eager HF generate.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 200 python3 -m pytest -q -m gpu tests/test_siblings.py tests/test_inference.py \
  -k "fused_siblings or decode_kernels_match_reference_gpu or fused_decode_repeats"
M=dense,dense+fused,lowrank,lowrank+fused,monarch,monarch+fused,blockdiag,blockdiag+fused,nm24,nm24+fused
step floor 380 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models "$M" \
  --graph-batches 1 --eager-models "$M" --generate-models "" --step-compile "$M"
exit 0
