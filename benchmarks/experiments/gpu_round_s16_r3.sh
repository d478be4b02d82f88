#!/usr/bin/env bash
# Session 16, GPU round 3 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s16_r3.sh
# The mma.sp kernel with four blocks in flight, and above 8 tokens in programs of 16 tokens (two n8 tiles) or of 8:
# correctness of each form, per layer at 4 / 8 / 16 / 32 tokens beside the expanded tile.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step check 150 python3 benchmarks/experiments/nm24_sparse_mma.py --out "$OUT/12" --settings \
  '[{"NM24_SP_DEPTH": 4}, {"NM24_SP_TOKENS": [1, 64], "NM24_SP_TOKEN_BLOCK": 8}, {"NM24_SP_TOKENS": [1, 64]}]'
step layers 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --tokens 4,8,16,32 --structures nm24 \
  --variants-only decode@nosp,decode@d4,decode@sp32,decode@sp32tb8,decode@sp32tb8d4
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
