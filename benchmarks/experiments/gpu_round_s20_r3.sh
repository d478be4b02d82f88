#!/usr/bin/env bash
# Session 20, GPU round 3 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s20_r3.sh
# The `bench kernels` rows still below dense at 4-16 tokens (session 16, kernels-20261204T205408Z.json, graphs):
# low-rank rank=1024 at 4096^2 (0.98x / 0.97x at 4 / 16 tokens, auto picked cuBLAS's two GEMMs) and rank=512 at
# 2048->8192 (0.86x / 0.83x): every candidate timed cold, with the decode kernels' multi-token variants, among them
# three not tried before: the PDL pair at any second-stage size (PDL_DOT_MAX_BYTES, now 4 MB: an 8 MB second stage
# takes the plain launch) and 2 / 8 programs per SM. Prediction: none closes the gap by itself (sessions 12-14 swept
# the rest); a variant that does shows as decode@... below dense's cold time.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step lr1024 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank:rank=1024 \
  --shapes 4096x4096 --tokens 4,16
step lr512 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank:rank=512 \
  --shapes 2048x8192 --tokens 4,16
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
