#!/usr/bin/env bash
# Session 12, GPU round 9 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r9.sh
# Round 8: low-rank's PDL pair above one token (second stage's weight loaded before it waits) was faster where that
# weight is small (2048x2048 at 50% 8.5 -> 6.8 us, 8192->2048 14.3 -> 12.9 us at 16 tokens) and slower where it is
# large (2048->8192 14.3 -> 20.9 us; 4096^2 rank 1024 0.70x): now taken up to 4 MB of second-stage weight, and the
# cost model knows the pair (PAIRED_MULTI_TOKEN_COST). The final kernel rows under graphs and the per-layer auto choice.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step kernels 120 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
step layers 100 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank \
  --tokens 4,16 --no-variants
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
