#!/usr/bin/env bash
# Session 13, GPU round 1 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s13_r1.sh
# Early launches (_triton_decode.EARLY_LAUNCH): in graphs and compiled code the first kernel of every decode product
# is launched by programmatic dependent launch after whatever kernel precedes it, loads its first weight tile, then
# waits for that grid. Predicted: ~0.5-1 us less per product in a captured step (a dependent launch's gap measured
# 0.6-1.1 us in session 5's floor models), i.e. 15-60 us of the batch-1 step. The GPU tests (the early forms captured
# after a long kernel that writes their input), then the batch-1 steps (captured, and compiled by inductor then
# captured) with the knob off and on, in separate processes.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step tests 200 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "early_launches or (decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
FLOOR=(python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,lowrank+fused,nm24,nm24+fused,monarch+fused
       --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,lowrank+fused,nm24,nm24+fused,monarch+fused)
step off 140 env STRUCTMAT_EARLY_LAUNCH=0 "${FLOOR[@]}"
step on 140 env STRUCTMAT_EARLY_LAUNCH=1 "${FLOOR[@]}"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
