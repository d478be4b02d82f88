#!/usr/bin/env bash
# Session 11, GPU round 3 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r3.sh
# Rounds 1-2: 2:4 positions packed 2 bits each made both N:M kernels slower, not faster (hot = cold: they are bound
# by instructions and latency, not bytes): the one-token row kernel at best 7.6 / 17.2 / 18.2 us (session 10's gather
# kernel on uint8 positions: 5.8 / 15.1 / 17.6), the expanded-tile kernel at 16 tokens 21-40 us (uint8: 8.4 / 19.6 /
# 21.0). Here the same kernels on one byte per position (STRUCTMAT_MIN_POSITION_BITS=8: session 10's storage): the
# row kernel's 2-D tiles load positions as contiguous bytes (13-15 SASS instructions a value, against the gather
# kernel's ~30); the expanded-tile kernel's loop compiles to session 10's (711 instructions). Predicted: one token
# within 10% of the gather kernel or faster; 16 tokens as session 10.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
export STRUCTMAT_MIN_POSITION_BITS=8  # (the experiment's switch; uint8 positions are the storage again since)
step layers 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 --tokens 1,16
step floor 180 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --graph-batches 1,8,32 --eager-models "" --generate-models "" --step-compile dense,nm24,nm24+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
