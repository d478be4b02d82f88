#!/usr/bin/env bash
# Session 12, GPU round 8 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r8.sh
# Low-rank at 2-16 tokens as a PDL pair whose second launch (``_pdl_stage2_dot``) loads its weight tile before
# waiting for the first stage (round 2's pair waited before any load and was slower): predicted, the second stage's
# weight streams under the first stage, as in the one-token pair (4.9 us at 2048->8192 rank 512, one token), so
# 2048->8192 at 16 tokens from 14.2 us cold toward ~9 us, and the kernel rows at rank=in/4 to >= 1.0x dense. The GPU
# tests first (bit-for-bit repeats and direct launches cover low-rank at 16 tokens).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 200 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch"
step layers 120 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank \
  --tokens 4,16
step kernels 120 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
