#!/usr/bin/env bash
# Session 21, GPU round 1 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s21_r1.sh
# New since the last GPU (session 21, written without one):
# - the many-token Triton launches (Monarch's first stage, the grouped GEMM, the N:M tile expansion) go past
#   Triton's per-call binding after two calls (_launch.LaunchCache, as the decode launches since session 9);
#   prediction: eager prefill host time per forward -1 to -3 ms for Monarch (prefill_fused host_ms, gap1 against
#   gap0 = STRUCTMAT_DIRECT_LAUNCH=0), more for 2:4 (4 expansions per layer call);
# - the sparse tiles' GEMMs write into their output columns in inference (no cat): 2:4 eager prefill 0.67x ->
#   0.8-0.9x; nm_prefill_tiles also times tile fractions 0.25 / 0.5 / 1 (fewer, larger tiles);
# - fused Monarch siblings at many tokens run one grouped product (ops.monarch_siblings): q/k/v 1.2x -> 1.45-1.6x
#   dense per member-equivalent, gate/up within 5%, the fused model's prefill 0.4-0.6 ms faster than unfused
#   (siblings_many; low-rank's group: one GEMM over the stacked V and one strided-batched GEMM, 5-10% on q/k/v;
#   2:4's: the stacked rows' tiles, a third of the launches, 5-15%).
# Round 2 has the prefill rows (host time with and without the direct launches; bench infer).
# The GPU tests first (LaunchCache's direct path, the fused siblings at 300 tokens, N:M expansion; session 22: the
# direct launches now pass addresses, covered by the direct-launch tests; eager decode on two streams at once:
# per-stream plans and counters; the decode kernels against float64 again, eager gated N:M now forming its input
# in the row kernel; round 2 has session 22's generate held-bytes test).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 240 python3 -m pytest -q -p no:warnings -m gpu tests/test_inference.py tests/test_kernels.py \
  tests/test_siblings.py -k "many_token_launches or direct_launch or launch_runs or nm_many_tokens or siblings_match or gated_mlp_at_many or two_streams \
  or decode_kernels_match_reference or eager_form_matches or fused_decode_repeats or different_widths"
step siblings 150 python3 benchmarks/experiments/siblings_many.py --out "$OUT/12"
step tiles 120 python3 benchmarks/experiments/nm_prefill_tiles.py --out "$OUT/12"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
