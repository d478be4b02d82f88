#!/usr/bin/env bash
# Session 11, GPU round 4 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r4.sh
# Packed positions dropped (rounds 1-2: slower in both N:M kernels); uint8 positions with the 2-D row kernel at one
# token, its defaults from round 3: rows 4 at a time, 512 values per iteration where a row keeps >= 4096 values.
# Predicted (round 3): 2:4 per layer at one token 4.8 / 10.8 / 10.6 us cold (1.25 / 0.99 / 1.29x dense); the captured
# batch-1 step faster than round 3's 0.85x (unfused) / 0.95x (fused) compiled. The GPU tests, the row kernel's
# variants, the 2:4 model steps, and `structmat bench kernels` rows at 1-16 tokens under graphs.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch"
step layers 120 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 --tokens 1,16
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --graph-batches 1,8,32 --eager-models "" --generate-models "" --step-compile dense,nm24,nm24+fused
step kernels 90 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 70
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
