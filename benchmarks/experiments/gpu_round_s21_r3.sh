#!/usr/bin/env bash
# Session 21, GPU round 3 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s21_r3.sh
# The must-show prefill row (unfused models; session 20's unrun round 5: compiled by block replayed from CUDA
# graphs), then bench kernels' forward rows at 1-16 tokens under CUDA graphs with the cold columns (session 20, not yet run: one
# graph over copies of the layer exceeding 256 MB, each call's weight from HBM as in a model; the hot column keeps a
# 32 MB dense weight in L2). Prediction: the hot column's 9 rows below dense (0.81-0.99x) read >= 1.0x cold, except
# perhaps 2:4 at 16 tokens.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step prefill 200 python3 -m structmat bench infer --structures monarch,lowrank,blockdiag,nm24 \
  --steps prefill_tps,prefill_compiled --prefill-compile-mode reduce-overhead --no-kernels --reps 5 \
  --budget-s 170 --out "$OUT/12"
step kernels 180 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 150
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
