#!/usr/bin/env bash
# Session 13, GPU round 5 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s13_r5.sh
# The final tree (early launches dropped: rounds 1 and 4 measured them no faster; the dispatch's graph break fixed):
# the GPU tests, then the batch-1 steps of every structure in one process (captured, and compiled by inductor then
# captured), the must-show's compiled column.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step tests 220 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "one_graph or captured_decode_reads or (decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
M=dense,lowrank,lowrank+fused,monarch,monarch+fused,blockdiag,blockdiag+fused,nm24,nm24+fused
step floor 200 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1 \
  --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
