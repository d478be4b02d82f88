#!/usr/bin/env bash
# Session 10, GPU round 6 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r6.sh
# 2:4 at 32-64 tokens ran at 0.2-0.4x dense per layer with 16-token tiles (each token block expands the same values
# again). Wider token tiles:
#   1. 2:4 per layer at 32 and 64 tokens with token tiles up to 32 / 64 (decode_layers.py NM_VARIANTS);
#   2. the N:M op against float64 at 17-64 tokens and the 2:4 model's captured step at batch 8 / 32 for each largest
#      token tile (nm_token_tile.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step nm-layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 --tokens 32,64
step tile 200 python3 benchmarks/experiments/nm_token_tile.py --out "$OUT/12"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
