#!/usr/bin/env bash
# Session 11, GPU rounds 1 and 2 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r1_r2.sh
# Both rounds ran these commands on working trees that stored N:M positions packed (position_bits(m): 2 bits each
# for 2:4, 4 a byte, low bits first) and were not kept: packing made both N:M kernels slower (round 3 and the README,
# "Session 11"). On main the same commands measure the uint8 form.
# Round 1 ran this first form:
# N:M positions now packed (2 bits each for 2:4: 1.125 bytes per dense element in bf16, was 1.5) and a new one-token
# kernel (_decode_nm_row: value tiles prefetched, positions unpacked from one byte per 4 values, split over the
# values). Predicted: 2:4 at one token 1.3-1.6x dense per layer cold (was 0.72-1.04x with the gather kernel and uint8
# positions), above one token 5-10% faster than session 10's 0.57-0.78x (fewer position bytes; the expansion bound
# stays). The GPU tests first (kernels vs float64, the split reduction bit for bit), then per-layer variants, then the
# captured step of the 2:4 models at batch 1/8/32 and compiled at batch 1.
# Round 2 the second:
# Round 1: the first one-token row kernel (3-D tiles, one byte per 4 values broadcast) ran at 0.47-0.57x dense:
# its loop shuffled tiles through shared memory (sm_90 SASS: 8 barriers, ~40 instructions per value). Now 2-D tiles,
# each value's position byte loaded in the value tile's shape (no barrier in the loop, 12.6-14.6 instructions a
# value), masks only where a tile is partial. Predicted: one token 1.2-1.6x dense per layer (memory-bound at 1.125
# bytes per dense element against 2). The expanded-tile kernel's positions the same way (round 1 unpacked them by
# joins: 54% more instructions than uint8's loop; now 43% more): 16 tokens within 10% of round 1.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch"
step layers 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 --tokens 1,16
step floor 180 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --graph-batches 1,8,32 --eager-models "" --generate-models "" --step-compile dense,nm24,nm24+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
