#!/usr/bin/env bash
# Session 21, GPU round 1 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s21_r1.sh
# New since the last GPU (session 21, written without one): the many-token Triton launches (Monarch's first stage,
# the grouped GEMM, the N:M tile expansion) go past Triton's per-call binding after two calls (_launch.LaunchCache,
# as the decode launches since session 9), and the sparse tiles' GEMMs write straight into their output columns in
# inference (no cat of the whole output). Predictions: eager prefill's host time per forward falls by ~1-3 ms for
# Monarch (one launch per layer call through the binding, 56 calls) and by more for 2:4 (4 per call): prefill_fused
# host_ms with STRUCTMAT_DIRECT_LAUNCH=0 against 1 shows it; 2:4 eager prefill 0.67x -> 0.8-0.9x (nm_prefill_tiles:
# the cat was ~1.4 ms of GPU time per forward; larger tiles fewer launches); the GPU tests first.
# Then session 20's round 5, unrun: compiled prefill replayed from CUDA graphs (prediction: dense ~16 ms, Monarch
# >= 1.3x, low-rank ~1.6x, block-diagonal ~2x), and bench kernels' rows at 1-16 tokens with the cold columns.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 90 python3 -m pytest -q -p no:warnings -m gpu tests/test_inference.py tests/test_kernels.py \
  -k "many_token_launches or direct_launch or launch_runs or nm_many_tokens"
step tiles 120 python3 benchmarks/experiments/nm_prefill_tiles.py --out "$OUT/12"
step gap1 60 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" --models dense,monarch,nm24
step gap0 60 env STRUCTMAT_DIRECT_LAUNCH=0 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" \
  --models dense,monarch,nm24
step prefill 110 python3 -m structmat bench infer --structures monarch,lowrank,blockdiag,nm24 \
  --steps prefill_tps,prefill_compiled --prefill-compile-mode reduce-overhead --no-kernels --reps 5 \
  --budget-s 75 --out "$OUT/12"
step kernels 60 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 40
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
