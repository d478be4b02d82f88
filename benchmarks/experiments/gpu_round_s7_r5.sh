#!/usr/bin/env bash
# Session 7, GPU round 5 (one H200, nothing carried), issue 12's 2:4 decode: the few-token N:M kernel's three forms
# (gather: the form of session 6; select; split), from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s7_r5.sh
#   1. per layer at 1 token (cold, from CUDA graphs), every form beside dense and torch's semi-structured 2:4;
#   2. the compiled decode step (inductor, then captured) of the 2:4 model with each form (dense once, first).
# Measured at commit 0842ea7 (21:12Z): the gather form stayed fastest and the other two were removed after; the
# script needs that commit's kernels (git checkout 0842ea7) to reproduce the select/split rows.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 75 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 --tokens 1
STRUCTMAT_NM_FEW_FORM=gather step floor-gather 75 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,nm24 --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,nm24
for form in select split; do
  STRUCTMAT_NM_FEW_FORM=$form step floor-$form 40 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
    --models nm24 --graph-batches 1 --eager-models "" --generate-models "" --step-compile nm24
done
exit 0
