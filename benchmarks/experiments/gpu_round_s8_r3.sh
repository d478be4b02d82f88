#!/usr/bin/env bash
# Session 8, GPU round 3 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s8_r3.sh
# The one-token two-stage product (low-rank, Monarch; single layers and fused siblings) as two launches joined by
# programmatic dependent launch (STRUCTMAT_PDL_DECODE=1) against the one-grid ticket kernel (the default):
#   1. the GPU tests of the decode kernels and fused siblings with PDL on (bit-for-bit repeats, eager and graphs);
#   2. per-group cost, PDL off and on (decode_groups.py);
#   3. the decode step (captured; inductor-compiled then captured) with PDL on, beside dense in one process.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests-pdl 200 env STRUCTMAT_PDL_DECODE=1 python3 -m pytest -q -m gpu tests/test_siblings.py \
  tests/test_inference.py -k "fused_siblings or decode_kernels_match_reference_gpu or fused_decode_repeats"
step groups-grid 60 python3 benchmarks/experiments/decode_groups.py --out "$OUT/12" --structures lowrank,monarch \
  --variants base
step groups-pdl 60 env STRUCTMAT_PDL_DECODE=1 python3 benchmarks/experiments/decode_groups.py --out "$OUT/12" \
  --structures lowrank,monarch --variants base
M=dense,dense+fused,lowrank,lowrank+fused,monarch,monarch+fused
step floor-pdl 200 env STRUCTMAT_PDL_DECODE=1 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models "$M" \
  --graph-batches 1 --eager-models "" --generate-models "" --step-compile "$M"
exit 0
