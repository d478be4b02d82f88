#!/usr/bin/env bash
# Session 13, GPU round 2 (one H200, nothing carried), issue 12, from the repo root, with old/a and old/b holding
# `git archive f9b765d src benchmarks/experiments` and the same of c40468b (and this step_profile.py):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s13_r2.sh
# Round 1: the fused low-rank model's compiled batch-1 step took 0.474 ms (early launches off and on alike) where
# session 12 round 6 (f9b765d) measured 0.4415. Bisect: the same measurement with the code of f9b765d, c40468b and
# now (early launches off), and the kernels of one compiled step, now and at f9b765d.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
FL=(--models dense,lowrank+fused --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,lowrank+fused)
PR=(--models lowrank+fused --batch 1 --compile)
step cur 100 env STRUCTMAT_EARLY_LAUNCH=0 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12/cur" "${FL[@]}"
cd old/a && step a 100 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12/a" "${FL[@]}" && cd ../..
cd old/b && step b 100 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12/b" "${FL[@]}" && cd ../..
step prof_cur 100 env STRUCTMAT_EARLY_LAUNCH=0 python3 benchmarks/experiments/step_profile.py --out "$OUT/12/cur" "${PR[@]}"
cd old/a && step prof_a 100 python3 benchmarks/experiments/step_profile.py --out "$OUT/12/a" "${PR[@]}" && cd ../..
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
