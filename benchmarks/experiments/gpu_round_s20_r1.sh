#!/usr/bin/env bash
# Session 20, GPU round 1 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s20_r1.sh
# Where the prefill time goes. Session 19 measured the Monarch model's prefill 4x2048 at 1.17x dense while its
# linears alone run 1.5-1.6x (MLP) and 1.16x (2048^2): the per-layer times account for ~12 of dense's 23.5 ms, so
# about half of a dense prefill is work no structure of the linears touches (attention, norms, rotary, activation,
# residuals: eager HF runs each as its own kernels). Prediction: the kernel breakdown shows that half; compiled by
# inductor (those elementwise chains fused) dense loses ~4-6 ms and the structured models' ratios rise toward their
# linears' (Monarch ~1.3x, low-rank ~1.4x, block-diagonal ~1.6x).
# 1. prefill_fused.py (session 18's round, blockdiag added): eager prefill, host/GPU busy/idle, top kernels by time
# 2. bench infer --steps prefill_tps,prefill_compiled: eager and inductor-compiled prefill, same process per model
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step gap 200 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" \
  --models dense,monarch,monarch+fused,lowrank,blockdiag
step prefill 330 python3 -m structmat bench infer --structures monarch,lowrank,blockdiag \
  --steps prefill_tps,prefill_compiled --no-kernels --reps 5 --budget-s 300 --out "$OUT/12"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
