#!/usr/bin/env bash
# Session 27, GPU call A (one H100/H200), issue 12, from the repo root, after `bash benchmarks/experiments/devshim.sh`
# here, with carry=[".devshim"]:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s27_a.sh
# 1. The GPU tests of test_generate.py again: `--loop graph` changed three times after its GPU test passed (warm-up
#    position reset, inference mode, the capture shared with bench.infer), tested on the CPU only since.
# 2. `structmat generate --loop graph --compile inductor` at batch 1 on this card, each structure against dense in one
#    process (3 interleaved rounds). Prediction (H200): near session 24's H200 compiled step, fused: low-rank
#    1.48-1.50x, Monarch 1.51-1.52x, block-diagonal 1.70x, 2:4 1.42-1.44x.
# The model folders go to out/ (ignored, kept on a warm machine) so that call B can reuse them.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 150 env PYTHONPATH="$PWD/src:$PWD/.devshim" python3 -m pytest -q -p no:warnings -p no:logging -m gpu \
  tests/test_generate.py
D=$PWD/out/s27-folders
[ -d "$D/nm24" ] || step folders 120 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda
for s in lowrank blockdiag monarch nm24; do
  step "loop-compiled-$s" 95 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" \
    --prompt "w5 w6 w7 w8" --max-new-tokens 64 --rounds 3 --loop graph --compile inductor \
    --json "$STEP_DIR/generate-$s-loop-compiled.json"
done
exit 0
