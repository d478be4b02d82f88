#!/usr/bin/env bash
# Session 14, GPU round 7 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s14_r7.sh
# The final Monarch rule (MONARCH_STAGE_COST refitted on rounds 5-6 at 2-64 tokens; the Triton path allowed at an
# off-tile block rank up to 64 tokens): Monarch per layer at 32 / 64 tokens (auto against each path), and the Monarch
# models' captured steps at batch 1 / 8 / 32 and compiled batch-1 step beside dense's, on this tree and on the tree
# before (old/a = `git archive d1cd3ef src benchmarks/experiments`, untracked, carried with the working tree).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 100 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --no-variants --tokens 32,64 \
  --structures monarch,monarch:nblocks=8 --shapes 2048x8192,4096x4096
M=dense,monarch,monarch+fused
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,8,32 \
  --eager-models "" --generate-models "" --step-compile dense,monarch+fused
mkdir -p "$OUT/12/old"
step floor_old 150 python3 old/a/benchmarks/experiments/decode_floor.py --out "$OUT/12/old" --models $M \
  --graph-batches 1,8,32 --eager-models "" --generate-models "" --step-compile dense,monarch+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
