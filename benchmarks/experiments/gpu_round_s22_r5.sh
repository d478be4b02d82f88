#!/usr/bin/env bash
# Session 22, GPU round 5 (one H200), issue 12 deliverable 6's second row, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s22_r5.sh
# The `structmat compress` checkpoint of the bench shape (low-rank whitened 50%, 16 calibration samples; session 7
# measured it before the eager forms, fusion and the direct launches: prefill 1.30x, eager b1 1.00x, compiled b1
# 0.68x), reloaded by load_pretrained, unfused and fused (`--structures checkpoint+fused`), beside dense in one
# process: memory, prefill 4x2048 (eager and compiled by block with CUDA graphs), graph steps b1/8/32, eager HF
# generate b1, the decode step compiled by inductor and replayed from a CUDA graph b1 (the must-show's compiled
# decode; HF's compiled generate is left out for time). Prediction: as the bench's low-rank rows (session 20
# and the s21 rounds): prefill ~1.3x eager, ~1.6x compiled; compiled b1 ~1.24x unfused, ~1.48x fused; eager b1
# ~0.95-1.0x unfused, ~1.03-1.06x fused; after forward / params <= 1.05.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step ckpt-build 120 python3 benchmarks/infer_checkpoint.py --work /tmp/ckpt --calib-samples 16 --tokenizer-files 100
CK=$(ls -d /tmp/ckpt/compressed/target-* 2>/dev/null | head -1)
step ckpt-infer 420 python3 -m structmat bench infer --structures checkpoint+fused --checkpoint "${CK:-/tmp/ckpt/none}" \
  --batches 1,8,32 --eager-batches 1 --compiled-batches 1 --new-tokens 32 --reps 3 --compile-backend none \
  --step-compile-mode default --prefill-compile-mode reduce-overhead --no-kernels --budget-s 400 --out "$OUT/12"
cp /tmp/ckpt/compressed/compress.json "$OUT/12/ckpt-compress.json" 2>/dev/null
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
