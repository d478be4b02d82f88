#!/usr/bin/env bash
# Session 14, GPU round 5 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s14_r5.sh
# Monarch at 4 and 16 tokens, every backend, cold and hot: the bench model's layers (monarch = nb=4 at 50%) and the
# rows of `structmat bench kernels` (monarch:nblocks=4 / 8 at 4096^2, 2048->8192, 8192->2048), for a few-token cost
# fit that tells decode from triton by shape (session 13 round 6 measured them opposite at 2048->8192 and 8192->2048).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 300 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --no-variants --tokens 2,4,16 \
  --structures monarch,monarch:nblocks=4,monarch:nblocks=8 --shapes 2048x2048,4096x4096,2048x8192,8192x2048
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
