#!/usr/bin/env bash
# Session 24, GPU call D (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s24_d.sh
# Call C found `structmat generate --compile inductor` (reduce-overhead) failing on the GPU: the one-grid decode
# kernel's counters, first needed while CUDA-graph trees warm the graph up, came from the graph's private pool
# (allocations routed per thread) and were kept ("tensor(s) in the cudagraph pool not tracked as outputs"). Now made
# by a helper thread (_triton_decode._kept_zeros). The new GPU test, the held-bytes test that found it, and the other
# counter tests. test_generate's tiny models need MiniLM's tokenizer: run devshim.sh here first, carry .devshim.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 300 env PYTHONPATH="$PWD/src:$PWD/.devshim" python3 -m pytest -q -p no:warnings -m gpu \
  tests/test_inference.py tests/test_generate.py -k "kept_counters or two_streams or generate"
rm -rf "$OUT/12"; exit 0
