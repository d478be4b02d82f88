#!/usr/bin/env bash
# Session 12, GPU round 4 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r4.sh
# Round 3: the 2:4 expanded-tile kernel with 2-warp programs, 8 per SM: 16 tokens 7.2 / 15.5 / 15.5 us cold (was
# 8.0 / 17.4 / 19.8): now the default up to 16 tokens (not the gated down product: 4 warps, it spilled with 2). Low-rank
# above one token: the cost entry refitted (decode below ~11 MB of weight). Here: the GPU tests, the warps/programs
# around the new default at 4-64 tokens, the kernel rows under graphs, the captured steps at batch 1 / 8 / 32
# (predicted: batch 8 / 32 2:4 steps faster than session 11's 0.84-0.88x dense; batch 1 unchanged).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 200 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
step layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24,lowrank \
  --tokens 4,16,64 --variants-only decode@t4w4,decode@w1,decode@t16w1,decode@t4w2,decode@wide-w2
step kernels 120 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
step floor 200 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,lowrank,nm24,nm24+fused --graph-batches 1,8,32 --eager-models "" --generate-models "" \
  --step-compile dense,nm24+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
