#!/usr/bin/env bash
# Session 23, GPU call A (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s23_a.sh
# Sessions 21-22's rounds in the order that matters if only one call comes: first the GPU tests of code that landed
# without a GPU (direct launches passing addresses, two streams, decode kernels against float64, GQA q/k/v, biased
# siblings), then the must-show eager HF generate row (predictions: unfused +2-4% from 0.94-0.98x, fused 2:4
# 0.99x -> ~1.01x), then the host-cost A/B that explains it.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 200 python3 -m pytest -q -p no:warnings -m gpu tests/test_inference.py tests/test_kernels.py \
  tests/test_siblings.py -k "many_token_launches or direct_launch or launch_runs or nm_many_tokens or siblings_match or gated_mlp_at_many or two_streams \
  or decode_kernels_match_reference or eager_form_matches or fused_decode_repeats or different_widths or captured_decode or compiled_decode_step"
step eager 250 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-rounds 9 \
  --eager-interleaved dense,lowrank,monarch,blockdiag,nm24,lowrank+fused,monarch+fused,blockdiag+fused,nm24+fused
step hostcosts 100 python3 benchmarks/experiments/host_costs.py --out "$OUT/12"
rm -rf "$OUT/12"; exit 0
