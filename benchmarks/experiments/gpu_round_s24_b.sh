#!/usr/bin/env bash
# Next session's GPU call B (one H100 or H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s24_b.sh
# The must-show compiled batch-1 decode step for every model on the lent GPU (measured only on the H200, sessions
# 13-16: unfused low-rank 1.24x, Monarch 1.25x, block-diagonal 1.54x, 2:4 1.28x; fused 1.48-1.50x, 1.51-1.52x,
# 1.70x, 1.42-1.44x). Session 23's H100 has no such row; predictions for an H100: within 5% of the H200's ratios
# (both are bandwidth-bound at one token; the H100's HBM3 is 3.35 against 4.8 TB/s, which lengthens dense and
# structured steps alike). Then the graph (captured eager) step at batch 1 / 8 / 32, whose batch-8 capture of fused
# Monarch is where session 23's capture bug bit.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
M=dense,lowrank,monarch,blockdiag,nm24,lowrank+fused,monarch+fused,blockdiag+fused,nm24+fused
step step 420 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,8,32 \
  --eager-models "" --generate-models "" --step-compile $M
rm -rf "$OUT/12"; exit 0
