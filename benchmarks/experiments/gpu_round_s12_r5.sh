#!/usr/bin/env bash
# Session 12, GPU round 5 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r5.sh
# Around round 4's defaults (2:4 expanded tile in 2-warp programs up to 16 tokens; low-rank's first stage summed in its
# kernel): the 2:4 dense tile 64 / 256 wide and its input pipeline 2 / 4 deep; the gemv kernel's warps, pipeline depth
# and reduction tile for low-rank's two stages at 4 and 16 tokens. Predicted: within 10% of the defaults (earlier
# sweeps at 4 warps found 128 wide best); a clear win is taken as the default in round 6.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step layers 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24,lowrank \
  --tokens 4,16 --variants-only decode@tk64,decode@tk256,decode@st2,decode@st4
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
