#!/usr/bin/env bash
# Session 20, GPU round 6 (one H200), issue 12, from the repo root: round 5's prefill step alone, for the device time
# left (round 5 was never started: three machine starts refused):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s20_r6.sh
# Prediction as round 5's: replayed from CUDA graphs, dense ~16 ms, Monarch >= 1.4x, low-rank ~1.6x, block-diagonal ~2x.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step prefill 80 python3 -m structmat bench infer --structures monarch,lowrank,blockdiag \
  --steps prefill_tps,prefill_compiled --prefill-compile-mode reduce-overhead --no-kernels --reps 5 \
  --budget-s 60 --out "$OUT/12"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
