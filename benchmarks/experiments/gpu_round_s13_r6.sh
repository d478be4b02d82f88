#!/usr/bin/env bash
# Session 13, GPU round 6 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s13_r6.sh
# For the next session: the Monarch nb=4 rows of `bench kernels` at 4-16 tokens run auto's `triton` backend under
# graphs, and 8192->2048 at 16 tokens is 0.96x dense there. Every way the bench model's Monarch layers can run at 4
# and 16 tokens (decode, triton, cublas, reference, auto, dense), cold and hot.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures monarch --tokens 4,16 --no-variants
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
