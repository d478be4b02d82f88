#!/usr/bin/env bash
# Session 12, GPU round 3 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r3.sh
# Round 2: programmatic dependent launch between the two launches above one token made low-rank slower (14.2 -> 18.3
# us at 2048->8192, 16 tokens) and the unmasked expanded tile was no faster: both removed. The 2:4 expanded-tile
# kernel runs at ~1.2 instructions a cycle per SM with 4 programs of 4 warps per SM: predicted, more programs per SM
# (NM_TARGET_PROGRAMS 8, 16; or 2-warp programs) raise that, up to ~1.6x faster at 4-16 tokens. Low-rank above one
# token: its first stage summed in its kernel, auto by the refitted cost (FEW_TOKEN_COST lowrank/decode).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24,lowrank,monarch \
  --tokens 4,16 --variants-only decode@t4,decode@t16,decode@t16min1,decode@t8w2,decode@t16w2
step kernels 120 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
