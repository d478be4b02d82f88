#!/usr/bin/env bash
# Session 16, GPU round 4 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s16_r4.sh
# The mma.sp kernel with values loaded 16 bytes a lane and the inputs put in fragment order first (PREP): correctness
# of each form (and without PREP, and up to 64 tokens in programs of 16 or of 8 tokens), per layer at 4 / 8 / 16 / 32
# tokens beside the expanded tile, the 2:4 models' captured steps at batch 1 / 2 / 8 / 32.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step check 150 python3 benchmarks/experiments/nm24_sparse_mma.py --out "$OUT/12" --settings \
  '[{"NM24_SP_PREP": false}, {"NM24_SP_TOKENS": [1, 64]}, {"NM24_SP_TOKENS": [1, 64], "NM24_SP_TOKEN_BLOCK": 8}]'
step layers 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 4,8,16,32 --structures nm24 \
  --variants-only decode@nosp,decode@noprep,decode@sp32,decode@sp64
M=dense,nm24,nm24+fused
step floor 130 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,2,8,32 \
  --eager-models "" --generate-models ""
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
