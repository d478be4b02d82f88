#!/usr/bin/env bash
# Session 15, GPU round 2 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s15_r2.sh
# 2:4 at one token by byte permutes (_triton_decode._decode_nm24_row: each group's two inputs picked from its four
# by PTX prmt, no gathered loads) on packed 2-bit positions: the GPU tests, per layer at 1-4 tokens (cold and hot;
# row-block / tile / warp variants) and the 2:4 models' captured steps at batch 1 / 8 and compiled batch-1 step
# beside dense's, on this tree and on the tree before (old/a = `git archive 3725670 src benchmarks/experiments`).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step tests 220 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "one_graph or captured_decode_reads or (decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
step layers 100 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 1 \
  --structures nm24 --variants-only decode@bm2,decode@bm8,decode@bj256,decode@bj512,decode@w8
mkdir -p "$OUT/12/old"
M=dense,nm24,nm24+fused
step floor 130 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,8 \
  --eager-models "" --generate-models "" --step-compile $M
step floor_old 130 python3 old/a/benchmarks/experiments/decode_floor.py --out "$OUT/12/old" --models $M \
  --graph-batches 1,8 --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
