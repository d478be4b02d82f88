#!/usr/bin/env bash
# Session 16, GPU round 5 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s16_r5.sh
# The shipped 2:4 forms (mma.sp at 3-32 tokens and at 2 on weights of 2^24+, a gated input formed first, the inputs
# in fragment order from 9 tokens): its GPU test, per layer at 1-32 tokens, the kernel bench under graphs, the 2:4
# models' captured steps at batch 1 / 2 / 8 / 32 and compiled batch-1 step beside dense's.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step tests 90 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "sparse_tensor_cores"
step layers 70 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 1,2,4,8,16,32 --structures nm24 \
  --no-variants
step kernels 120 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 60
M=dense,nm24,nm24+fused
step floor 110 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,2,8,32 \
  --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
