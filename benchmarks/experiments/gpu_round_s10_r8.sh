#!/usr/bin/env bash
# Session 10, GPU round 8 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r8.sh
# The fused Monarch model's captured step at batch 8 measured slower than the unfused one (round 5): the kernels of
# one captured step of each, at batch 8 and at batch 1 (step_profile.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step profile8 100 python3 benchmarks/experiments/step_profile.py --out "$OUT/12" --batch 8
step profile1 100 python3 benchmarks/experiments/step_profile.py --out "$OUT/12" --batch 1
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
