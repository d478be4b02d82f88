#!/usr/bin/env bash
# Session 26, GPU call 4 (one H100/H200), issue 12, from the repo root, after `bash benchmarks/experiments/devshim.sh`
# here, with carry=[".devshim"]:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s26_c.sh
# `structmat generate --loop graph` (new): structmat's greedy loop over a static cache, each token one CUDA-graph
# replay, the step eager or compiled by inductor first; at the bench shape against dense in one process each (rounds
# interleaved). Predictions (H100): eager-captured steps near the captured eager step's ratios (fused: low-rank
# 1.29x, Monarch 1.28x, block-diagonal 1.41x, 2:4 1.26x), compiled near the compiled step's (1.51x, 1.53x, 1.79x,
# 1.47x), dense ~1100-1300 tokens/s against ~620 in HF's compiled generate; the GPU tests first.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 150 env PYTHONPATH="$PWD/src:$PWD/.devshim" python3 -m pytest -q -p no:warnings -p no:logging -m gpu \
  tests/test_generate.py
D=/tmp/s26-folders
step folders 120 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda
for s in lowrank monarch blockdiag nm24; do
  step "loop-$s" 90 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" --prompt "w5 w6 w7 w8" \
    --max-new-tokens 64 --rounds 3 --loop graph --json "$STEP_DIR/generate-$s-loop.json"
done
for s in lowrank blockdiag monarch nm24; do
  step "loop-compiled-$s" 120 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" \
    --prompt "w5 w6 w7 w8" --max-new-tokens 64 --rounds 3 --loop graph --compile inductor \
    --json "$STEP_DIR/generate-$s-loop-compiled.json"
done
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
