#!/usr/bin/env bash
# Session 10, GPU round 9 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r9.sh
# (Run with the knob's earlier name, MULTI_TOKEN = {"max_splits": ...}.)
# Round 8: the fused Monarch model's decode products at batch 8 take 734 us per step against 529 unfused. Its down
# product's first stage (the gated input formed on load) runs unsplit above one token since round 4 (128 programs, one
# per SM): the captured step of Monarch unfused and fused at batch 8 and 32 with the first stage split up to 1 / 4
# / 8 ways (step_knobs.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step knobs 150 python3 benchmarks/experiments/step_knobs.py --out "$OUT/12" --models monarch,monarch+fused \
  --batches 8,32 --settings '[{}, {"MULTI_TOKEN_SPLITS": 4}, {"MULTI_TOKEN_SPLITS": 8}]'
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
