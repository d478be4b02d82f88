#!/usr/bin/env bash
# Written in session 27 for the next GPU call (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s28_a.sh
# Session 27 call E swept the multi-token gemv toward more, smaller programs (at most 3% either way). Its plan at
# batch 8 already runs 16-row blocks, each program re-reading the whole intermediate (the gate/up group's second
# stage: 1024 programs x 13 KB from L2 beside 26.7 MB of weight). This sweeps the other way: fewer, taller programs
# (TARGET_PROGRAMS 1 and 2) and 256-wide reduction steps below K = 2048 (BLOCK_K_SMALL), on the captured eager step
# at batch 8 with every low-rank / Monarch product forced onto the decode kernels, then as dispatched beside dense.
# Prediction: TARGET_PROGRAMS 1 with BLOCK_K_SMALL 256 takes >= 10% off the forced low-rank step (1.433 ms in call
# E); if it does, the plan's multi-token targets change and the cost model's multi-token fit is measured again.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step knobs-decode 200 env STRUCTMAT_BACKEND=decode python3 benchmarks/experiments/step_knobs.py --out "$STEP_DIR" \
  --models lowrank+fused,monarch+fused --batches 8,32 --settings '[{}, {"TARGET_PROGRAMS": 1},
  {"TARGET_PROGRAMS": 2}, {"BLOCK_K_SMALL": 256}, {"TARGET_PROGRAMS": 1, "BLOCK_K_SMALL": 256},
  {"GEMV_META": {"num_warps": 2}}]'
step knobs-auto 80 python3 benchmarks/experiments/step_knobs.py --out "$STEP_DIR/auto" \
  --models dense,lowrank+fused,monarch+fused --batches 8,32 --settings '[{}]'
exit 0
