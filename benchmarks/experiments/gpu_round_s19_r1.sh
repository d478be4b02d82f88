#!/usr/bin/env bash
# Session 19, GPU round 1 (one H200), issue 12, from the repo root (run in session 19, logs in
# benchmarks/results/logs/s19-round4/):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s19_r1.sh
# `structmat generate` as a user runs it, at the bench shape: folders of the dense and structured Llamas (random
# weights, a synthetic tokenizer: generate_folders.py), then each structure against the dense folder in one process,
# eager (fused siblings), 3 interleaved rounds of 64 tokens (compiled: gpu_round_s19_r2.sh, its own call).
# Expected: decode ratios near bench infer's eager HF generate (fused 1.02-1.12x, sessions 9/11). The JSONs carry the
# held and peak memory of each model too.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
D=/tmp/s19-folders
step folders 150 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda
for s in lowrank monarch blockdiag nm24; do
  step "eager-$s" 60 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" --prompt "w5 w6 w7 w8" \
    --max-new-tokens 64 --rounds 3 --json "$OUT/12/generate-$s-eager.json"
done
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
