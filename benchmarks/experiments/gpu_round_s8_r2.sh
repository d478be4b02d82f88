#!/usr/bin/env bash
# Session 8, GPU round 2 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s8_r2.sh
#   1. per-group decode cost at one token (fused q/k/v and gate/up, o, down) for every structure, and the launch
#      variants of the one-launch two-stage kernel for low-rank and Monarch (decode_groups.py);
#   2. eager HF generate, every model unfused and fused, interleaved over 5 rounds in one process (after the eager
#      group path keeps its decode plan: round 1 rebuilt it on every call).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step groups 300 python3 benchmarks/experiments/decode_groups.py --out "$OUT/12"
M=dense,dense+fused,lowrank,lowrank+fused,monarch,monarch+fused,blockdiag,blockdiag+fused,nm24,nm24+fused
step eager 220 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-interleaved "$M" --eager-rounds 5
exit 0
