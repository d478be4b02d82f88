#!/usr/bin/env bash
# Session 14, GPU round 4 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s14_r4.sh
# Low-rank above one token (4 and 16 tokens), the bench model's layers, cold and hot, every backend and the
# multi-token variants of decode_layers.py (MULTI_VARIANTS), among them session 14's: the PDL pair at every
# second-stage size ("decode@pair", lifting PDL_DOT_MAX_BYTES) with the second stage's tiles as now or smaller
# (_triton_decode.PDL_DOT_TILE: 182 registers and one program per SM at rank 816 now; 58-86 with the smaller tiles).
# Each decode candidate's relative error against float64 is recorded (err). The PDL_DOT_TILE knob and its variants
# are not in the tree (no variant was faster): git apply benchmarks/experiments/patches/s14_pdl_dot_tile.diff first.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 300 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank --tokens 4,16
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
