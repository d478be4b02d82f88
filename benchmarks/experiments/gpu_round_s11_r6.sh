#!/usr/bin/env bash
# Session 11, GPU round 6 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r6.sh
# The product command on the 2:4 models with the one-token row kernel (round 4's defaults; round 5: no other setting
# faster on the step): `structmat bench infer` for dense, 2:4 and 2:4 with fuse_siblings (the flags of
# gpu_round_infer.sh, no per-layer rows), merged; then the interleaved eager HF generate sample (9 rounds) of the
# same three. Predicted: eager batch 1 at or above dense for both 2:4 models (session 9: 0.87x unfused, 1.06x fused).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
MODELS="dense nm24 nm24+fused" SKIP_EXTRA=1 KERNELS=0 T_MODEL=62 bash benchmarks/experiments/gpu_round_infer.sh
step eager 90 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-interleaved dense,nm24,nm24+fused --eager-rounds 9
rm -rf "$OUT/12/parts"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
