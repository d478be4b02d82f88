#!/usr/bin/env bash
# Session 21, GPU round 2 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s21_r2.sh
# Prefill of the fused models with this session's changes (launch cache, 2:4 without cat, siblings' group products
# at many tokens), eager and compiled by block replayed from CUDA graphs (as session 20's unrun round 5; prediction:
# dense ~16 ms compiled, Monarch fused >= 1.3x, low-rank ~1.6x, block-diagonal ~2x, 2:4 ~0.85x eager); first the
# host and GPU time per eager forward with the direct launches on (gap1) and off (gap0: STRUCTMAT_DIRECT_LAUNCH=0).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
MODELS=dense,monarch,monarch+fused,lowrank+fused,nm24,nm24+fused
step gap1 90 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" --models $MODELS
step gap0 90 env STRUCTMAT_DIRECT_LAUNCH=0 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" \
  --models $MODELS
step prefill 200 python3 -m structmat bench infer --structures monarch+fused,lowrank+fused,nm24+fused \
  --steps prefill_tps,prefill_compiled --prefill-compile-mode reduce-overhead --no-kernels --reps 5 \
  --budget-s 170 --out "$OUT/12"
# (session 22) `structmat generate`'s held bytes without the cuBLAS workspaces that CUDA-graph recording frees
# (session 19: compiled low-rank held 651.0 MB for 666.4 MB of parameters): parameters <= held <= peak, eager and
# compiled by inductor, for the structured model and its dense baseline
step heldtest 150 python3 -m pytest -q -p no:warnings -m gpu tests/test_generate.py
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
