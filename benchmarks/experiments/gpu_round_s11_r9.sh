#!/usr/bin/env bash
# Session 11, GPU round 9 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r9.sh
# After round 8 (the gated input formed first): the compiled batch-1 steps of dense, fused low-rank (1.49x in session
# 9, unchanged at one token since) and fused 2:4 in one process, and the interleaved eager HF generate sample of
# dense and both 2:4 models (the gated input's own launch adds one launch per layer to eager decode).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step floor 120 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,lowrank+fused,nm24+fused \
  --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,lowrank+fused,nm24+fused
step eager 90 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-interleaved dense,nm24,nm24+fused --eager-rounds 9
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
