#!/usr/bin/env bash
# Session 10, GPU round 5 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r5.sh
# The session's state, measured once more:
#   1. GPU tests: the decode kernels (bf16) against float64, repeated calls bit for bit, the eager form, direct launch;
#   2. the captured decode step at batch 1, 8, 32 of dense and every structure (fused where that is the better form),
#      and the compiled batch-1 step of 2:4 (decode_floor.py);
#   3. structmat bench kernels forward at 1/4/16 tokens under CUDA graphs, every structure (2:4 among them).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 170 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or eager_form or direct_launch"
step floor 220 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,lowrank+fused,monarch,monarch+fused,blockdiag+fused,nm24,nm24+fused --graph-batches 1,8,32 \
  --eager-models "" --generate-models "" --step-compile dense,nm24,nm24+fused
step kernels 90 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 70
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
