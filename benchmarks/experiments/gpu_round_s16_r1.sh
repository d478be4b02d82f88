#!/usr/bin/env bash
# Session 16, GPU round 1 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s16_r1.sh
# 2:4 on the sparse tensor cores (mma.sp, ``_gluon_nm24``, from 3 tokens): correctness for ordered and unordered
# positions, per layer at 1-16 tokens beside the expanded tile (decode@nosp) and other warp counts, the kernel bench
# under graphs, the 2:4 models' captured steps at batch 1 / 2 / 8 / 32 and compiled batch-1 step.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step check 150 python3 benchmarks/experiments/nm24_sparse_mma.py --out "$OUT/12"
step layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 1,2,4,8,16 --structures nm24 \
  --variants-only decode@nosp,decode@sp1,decode@spw4,decode@spw16
step tests 200 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "decode_kernels_match_reference_gpu and (bfloat16 or float16)"
M=dense,nm24,nm24+fused
step floor 130 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,2,8,32 \
  --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
