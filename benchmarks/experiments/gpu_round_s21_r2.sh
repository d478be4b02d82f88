#!/usr/bin/env bash
# Session 21, GPU round 2 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s21_r2.sh
# The prefill must-show row with this session's changes (launch cache, 2:4 without cat, fused Monarch siblings'
# grouped product), eager and compiled by block replayed from CUDA graphs (session 20's unrun round 5; prediction:
# dense ~16 ms compiled, Monarch fused >= 1.3x, low-rank ~1.6x, block-diagonal ~2x, 2:4 ~0.85x eager), then bench
# kernels' rows at 1-16 tokens with the cold columns (each call's weight from HBM, as in a model).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step prefill 200 python3 -m structmat bench infer --structures monarch,monarch+fused,lowrank,lowrank+fused,blockdiag,nm24 \
  --steps prefill_tps,prefill_compiled --prefill-compile-mode reduce-overhead --no-kernels --reps 5 \
  --budget-s 170 --out "$OUT/12"
step kernels 90 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 60
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
