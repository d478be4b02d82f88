#!/usr/bin/env bash
# Session 23, GPU call B (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s23_b.sh
# The must-show prefill row (4x2048, eager and compiled reduce-overhead; last measured in session 20: Monarch eager
# 0.78-1.18x, compiled 1.25-1.29x, below 1.3x; sessions 21-22 predict -1 to -3 ms host per Monarch forward from the
# direct many-token launches), the cold columns of `bench kernels --graphs`, then the q/k/v and MLP host costs
# with real launches and the fused siblings at many tokens (session 21's predictions in gpu_round_s21_r1.sh).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step prefill 200 python3 -m structmat bench infer --structures monarch,lowrank,blockdiag,nm24 \
  --steps prefill_tps,prefill_compiled --prefill-compile-mode reduce-overhead --no-kernels --reps 5 \
  --budget-s 170 --out "$OUT/12"
step kernels 170 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 140
step host 60 python3 benchmarks/experiments/siblings_host.py --out "$OUT/12"
step siblings 110 python3 benchmarks/experiments/siblings_many.py --out "$OUT/12"
rm -rf "$OUT/12"; exit 0
