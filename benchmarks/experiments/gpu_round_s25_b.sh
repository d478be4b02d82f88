#!/usr/bin/env bash
# Next session's first GPU call (one H100/H200; a call of its own, up to 600 s), issue 12, from the repo root, after
# `bash benchmarks/experiments/devshim.sh` here, with carry=[".devshim"]:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s25_b.sh
# Every GPU test of the inference work on this tree in one pass. Session 25's call 3 ran out of its 300-s step after
# 5 of test_inference's 15 (Triton compiles many variants on a fresh machine's empty cache); earlier sessions ran them
# in -k groups. Prediction: all pass (test_generate's held-bytes test passed alone after session 25's fixes).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 570 env PYTHONPATH="$PWD/src:$PWD/.devshim" python3 -m pytest -q -p no:warnings -p no:logging -m gpu \
  --durations=15 tests/test_generate.py tests/test_inference.py
rm -rf "$OUT/12"; exit 0
