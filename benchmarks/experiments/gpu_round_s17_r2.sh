#!/usr/bin/env bash
# Session 17, GPU round 2 (one H200), issue 12, from the repo root (written in session 17; run in session 19, logs in
# benchmarks/results/logs/s19-round2/):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s17_r2.sh
# (1) The bench model's Monarch prefill (4x2048) and its layers at 8192 tokens with the fused many-token kernel off
# and on (rows auto / auto+fused) in one process (round 1 timed the kernel per layer). (2) Eager HF generate, batch
# 1, interleaved (3 rounds), dense and every structure unfused and fused: the eager must-show (>= 1.0x dense), not
# re-measured since session 11 (unfused 0.87-1.00x then, fused 1.02-1.12x).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step prefill 200 python3 benchmarks/experiments/prefill_layers.py --out "$OUT/12" --structures monarch --tokens 8192 \
  --monarch-fused
step eager 300 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-rounds 3 \
  --eager-interleaved dense,lowrank,monarch,blockdiag,nm24,lowrank+fused,monarch+fused,blockdiag+fused,nm24+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
