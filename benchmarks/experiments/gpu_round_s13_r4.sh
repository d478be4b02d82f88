#!/usr/bin/env bash
# Session 13, GPU round 4 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s13_r4.sh
# The dispatch's graph break fixed (round 3: low-rank models compiled into 37 graphs on this torch since c40468b).
# GPU tests (one graph per compiled step for every structure; early launches after a long kernel), then the batch-1
# steps (captured, and compiled by inductor then captured) with early launches off and on, twice each, alternating.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step tests 200 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "one_graph or early_launches or (decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch"
FLOOR=(python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,lowrank+fused,nm24,nm24+fused
       --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,lowrank+fused,nm24,nm24+fused)
for i in 1 2; do
  step off$i 100 env STRUCTMAT_EARLY_LAUNCH=0 "${FLOOR[@]}"
  step on$i 100 env STRUCTMAT_EARLY_LAUNCH=1 "${FLOOR[@]}"
done
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
