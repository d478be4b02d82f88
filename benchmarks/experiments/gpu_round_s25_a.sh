#!/usr/bin/env bash
# Session 25, GPU call A (one H100/H200), issue 12, from the repo root (run devshim.sh here first, carry .devshim):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s25_a.sh
# Session 25's first call (H100) found session 24's fix working (the kept-counters test passed; `structmat generate
# --compile inductor` no longer fails) and then the held-bytes test failing: the second model measured read 112 KB
# below its parameters, the first model's graph outputs freed from the CUDA-graph pool when the second's graphs ran.
# Held bytes now leave out CUDA-graph private pools. Prediction: test_generate's GPU test passes; every other GPU
# test of test_inference / test_generate still passes. Then the grouped GEMM's config sweep on Monarch's prefill
# launches (gemm_config_sweep.py; prediction there: the best config within 5% of today's pick).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 300 env PYTHONPATH="$PWD/src:$PWD/.devshim" python3 -m pytest -q -p no:warnings -p no:logging -m gpu \
  tests/test_generate.py tests/test_inference.py
step sweep 330 python3 benchmarks/experiments/gemm_config_sweep.py --out "$OUT/12"
rm -rf "$OUT/12"; exit 0
