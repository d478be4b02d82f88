#!/usr/bin/env bash
# Session 23, GPU call C (one H100/H200), issue 12 (not run: five later starts were refused; next session's first
# call), from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s23_c.sh
# Call A's GPU tests found two failures: the direct-launch test's 2:4 operands repeated positions within a group
# (random bytes; the sparse tensor cores and the strided call's expanded tile define those differently: now valid
# operands), and fused Monarch siblings at 16-64 tokens, where a capture takes each member's own grouped GEMM that
# eager calls (the group's decode product) never ran, autotuned inside the capture (now readied by the planning eager
# call, SiblingGroup._ready_capture). Rerun them, the two-streams test, then session 22's held-bytes test and
# prefill host time with and without the direct launches.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 300 python3 -m pytest -q -p no:warnings -m gpu tests/test_inference.py tests/test_siblings.py \
  -k "direct_launch or siblings_match or different_widths or gated_mlp_at_many or two_streams"
step heldtest 150 python3 -m pytest -q -p no:warnings -m gpu tests/test_generate.py
MODELS=dense,monarch,monarch+fused,lowrank+fused,nm24,nm24+fused
step gap1 90 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" --models $MODELS
step gap0 90 env STRUCTMAT_DIRECT_LAUNCH=0 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" \
  --models $MODELS
rm -rf "$OUT/12"; exit 0
