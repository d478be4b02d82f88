#!/usr/bin/env bash
# Session 27, GPU call B (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s27_b.sh
# 1. A checkpoint written by `structmat compress` (low-rank whitened, 50% parameters, bench shape) and its dense
#    source through `structmat generate --loop graph --compile inductor`. Prediction: near session 24's compiled step
#    for this checkpoint on the H200 (1.50x at batch 1).
# 2. `--loop graph --compile inductor` at batch 8 and 32 (the step is still memory-bound at 8; at 32 the weights'
#    bytes are shared by 32 rows and the activations and KV reads grow). Prediction: batch 8 near batch 1's ratios
#    (low-rank ~1.4x, block-diagonal ~1.6x), batch 32 lower (~1.2-1.4x).
# Reuses call A's out/s27-folders where the machine stayed warm; else builds them.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
D=$PWD/out/s27-folders
[ -d "$D/nm24" ] || step folders 120 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda
step ckpt-build 150 python3 benchmarks/infer_checkpoint.py --work /tmp/ckpt --calib-samples 16 --tokenizer-files 100
CK=$(ls -d /tmp/ckpt/compressed/target-* 2>/dev/null | head -1)
step ckpt-loop-compiled 100 python3 -m structmat generate --model "${CK:-/tmp/ckpt/none}" --baseline /tmp/ckpt/dense \
  --max-new-tokens 64 --rounds 3 --loop graph --compile inductor --json "$STEP_DIR/generate-ckpt-loop-compiled.json"
for b in 8 32; do
  for s in lowrank blockdiag; do
    step "loop-compiled-$s-b$b" 90 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" \
      --prompt "w5 w6 w7 w8" --max-new-tokens 64 --rounds 3 --batch $b --loop graph --compile inductor \
      --json "$STEP_DIR/generate-$s-loop-compiled-b$b.json"
  done
done
exit 0
