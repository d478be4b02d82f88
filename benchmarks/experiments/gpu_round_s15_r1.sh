#!/usr/bin/env bash
# Session 15, GPU round 1 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s15_r1.sh
# 2:4 with packed 2-bit positions (structures.sparse.pack_positions; 56% of dense's bytes, was 75%): per layer at
# 1-64 tokens (cold and hot) and the 2:4 models' captured steps at batch 1 / 8 / 32 and compiled batch-1 step beside
# dense's, on this tree and on the tree before (old/a = `git archive 3725670 src benchmarks/experiments`, untracked,
# carried with the working tree).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 120 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 1,4,16,64 \
  --structures nm24 --variants-only decode@bj256
mkdir -p "$OUT/12/old"
step layers_old 120 python3 old/a/benchmarks/experiments/decode_layers.py --out "$OUT/12/old" --tokens 1,4,16,64 \
  --structures nm24 --no-variants
M=dense,nm24,nm24+fused
step floor 140 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,8,32 \
  --eager-models "" --generate-models "" --step-compile $M
step floor_old 140 python3 old/a/benchmarks/experiments/decode_floor.py --out "$OUT/12/old" --models $M \
  --graph-batches 1,8,32 --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
