#!/usr/bin/env bash
# Session 15, GPU round 5 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s15_r5.sh
# The shipped 2:4 forms (packed positions; the byte-permute kernel at 1-2 tokens, NM24_ROW_TOKENS = 2; tiles expanded
# by byte permutes above): the GPU tests, per layer at 1 / 2 / 4 / 16 tokens, and the 2:4 models' captured steps at
# batch 1 / 2 / 8 / 32 and compiled batch-1 step beside dense's.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step tests 220 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "one_graph or captured_decode_reads or (decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
step layers 60 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 1,2,4,16 --structures nm24 \
  --no-variants
M=dense,nm24,nm24+fused
step floor 130 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,2,8,32 \
  --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
