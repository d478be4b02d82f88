#!/usr/bin/env bash
# Session 27, GPU call D (an H200 asked for), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s27_d.sh
# Call A's batch-1 `structmat generate --loop graph --compile inductor` rows on the other card. Prediction (H200):
# near session 24's H200 compiled step, fused: low-rank 1.48-1.50x, Monarch 1.51-1.52x, block-diagonal 1.70x,
# 2:4 1.42-1.44x (H100, call A: 1.57 / 1.55 / 1.88 / 1.49x).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
D=$PWD/out/s27-folders
[ -d "$D/nm24" ] || step folders 120 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda
for s in lowrank monarch blockdiag nm24; do
  step "loop-compiled-$s" 95 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" \
    --prompt "w5 w6 w7 w8" --max-new-tokens 64 --rounds 3 --loop graph --compile inductor \
    --json "$STEP_DIR/generate-$s-loop-compiled.json"
done
exit 0
