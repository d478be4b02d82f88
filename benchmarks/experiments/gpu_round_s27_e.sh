#!/usr/bin/env bash
# Session 27, GPU call E (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s27_e.sh
# Call C: at batch 8 the two-stage structures' multi-token decode gemv streams <= 0.8 TB/s (the gate/up group's
# second stage, K = 816: 256 programs of 7 reduction steps). A sweep of the gemv's plan knobs on the captured eager
# step at batch 8, every low-rank / Monarch product forced onto the decode kernels (STRUCTMAT_BACKEND=decode), then
# the auto step beside dense's. Prediction: more, shorter row blocks (TARGET_PROGRAMS 8 or 16: 32- or 16-row blocks)
# bring the forced low-rank step down by >= 15% (more bytes in flight per SM); warps and stages a few percent.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step knobs-decode 170 env STRUCTMAT_BACKEND=decode python3 benchmarks/experiments/step_knobs.py --out "$STEP_DIR" \
  --models lowrank+fused,monarch+fused --batches 8 --settings '[{}, {"TARGET_PROGRAMS": 8}, {"TARGET_PROGRAMS": 16},
  {"GEMV_META": {"num_warps": 8}}, {"GEMV_META": {"num_stages": 2}}, {"MULTI_TOKEN_PDL": false}]'
step knobs-auto 80 python3 benchmarks/experiments/step_knobs.py --out "$STEP_DIR/auto" \
  --models dense,lowrank+fused,monarch+fused --batches 8 --settings '[{}]'
exit 0
