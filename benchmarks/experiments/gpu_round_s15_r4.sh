#!/usr/bin/env bash
# Session 15, GPU round 4 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s15_r4.sh
# 2:4's byte-permute kernel taking up to 4 tokens in one program (_triton_decode.NM24_ROW_TOKENS): the GPU tests,
# per layer at 1-16 tokens (cold and hot) against its variants (up to 1 / 2 / 8 tokens, the gather kernel, the
# tiles expanded by compares), `structmat bench kernels` rows under CUDA graphs at 1 / 4 / 16 tokens, and the 2:4
# models' captured steps at batch 1 / 4 / 8 and compiled batch-1 step beside dense's.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step tests 220 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "one_graph or captured_decode_reads or (decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
step layers 120 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 1,2,3,4,8,16 \
  --structures nm24 --variants-only decode@r1,decode@r2,decode@r8,decode@gather,decode@noperm
step kernels 110 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
M=dense,nm24,nm24+fused
step floor 130 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,4,8 \
  --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
