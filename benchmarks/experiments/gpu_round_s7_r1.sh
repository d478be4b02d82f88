#!/usr/bin/env bash
# Session 7, GPU round 1 (one H200, nothing carried), issue 12's rows not measured in session 6, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s7_r1.sh
#   1. the compiled decode step (inductor, then captured) of dense, block-diagonal and 2:4 after the static-count
#      dispatch change (low-rank and Monarch were measured after it: decode-floor-20261203T184843Z.json);
#   2. the `structmat compress` checkpoint (low-rank whitened 50% of the bench shape, 16 calibration samples) ...
#   3. ... reloaded by load_pretrained, through `structmat bench infer` beside dense in the same process, with the
#      flags of the README's 13:17Z table.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,blockdiag,nm24 \
  --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,blockdiag,nm24
step ckpt-build 90 python3 benchmarks/infer_checkpoint.py --work /tmp/ckpt --calib-samples 16 --tokenizer-files 100
CK=$(ls -d /tmp/ckpt/compressed/target-* 2>/dev/null | head -1)
step ckpt-infer 170 python3 -m structmat.bench.infer --structures "" --checkpoint "${CK:-/tmp/ckpt/none}" \
  --batches 1,8,32 --eager-batches 1 --compiled-batches 1 --new-tokens 32 --reps 2 --compile-backend cudagraphs \
  --step-compile-mode none --no-kernels --out "$OUT/12"
cp /tmp/ckpt/compressed/compress.json "$OUT/12/ckpt-compress.json" 2>/dev/null
exit 0
