#!/usr/bin/env bash
# Session 12, GPU round 7 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r7.sh
# The fused low-rank model's compiled batch-1 step is 1.487x dense (target 1.5x: ~1% short). Its linear layers are the
# one-token two-stage products (the PDL pair): their tile budget, splits and warps on the captured step, with the
# default measured first and last (the noise), Monarch fused beside it (it shares these knobs and sits at 1.52x).
# Predicted: within 2% of the default (session 10's per-layer sweeps found no variant 3% better).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step knobs 300 python3 benchmarks/experiments/step_knobs.py --out "$OUT/12" --models dense,lowrank+fused,monarch+fused \
  --batches 1 --settings '[{}, {"FUSED_TILE": 4096}, {"FUSED_TILE": 16384}, {"FUSED_MAX_SPLITS": 4},
  {"FUSED_MAX_SPLITS": 16}, {"FUSED_WARPS": 8}, {}]'
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
