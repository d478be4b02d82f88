#!/usr/bin/env bash
# Session 19, GPU round 2 (one H200), issue 12, from the repo root (written in session 19, lent no GPU: not yet run;
# after gpu_round_s19_r1.sh):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s19_r2.sh
# `structmat generate --compile` (static cache, inductor reduce-overhead: CUDA graphs) at the bench shape, low-rank and
# block-diagonal against dense in one process each, 3 interleaved rounds of 64 tokens; the folders made again (a new
# call may get a fresh machine). Expected: near bench infer's compiled HF generate, 0 graphs while timed.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
D=/tmp/s19-folders
step folders 90 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda --structures lowrank,blockdiag
for s in lowrank blockdiag; do
  step "compiled-$s" 230 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" --prompt "w5 w6 w7 w8" \
    --max-new-tokens 64 --rounds 3 --compile --json "$OUT/12/generate-$s-compiled.json"
done
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
