#!/usr/bin/env bash
# Session 10, GPU round 1 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r1.sh
#   1. GPU tests: the decode kernels (the new expanded-tile N:M kernel among them) against float64, the eager form;
#   2. 2:4 per layer at 1-64 tokens, cold and hot, the N:M kernels' variants beside dense (decode_layers.py);
#   3. structmat bench kernels forward at 1/4/16 tokens under CUDA graphs, every structure (2:4 now in the grid);
#   4. fused Monarch prefill beside unfused and dense, with kernel profiles (prefill_fused.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or eager_form"
step nm-layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 \
  --tokens 1,2,4,8,16,32,64
step kernels 160 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 110
step prefill 110 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" --models dense,monarch,monarch+fused
exit 0
