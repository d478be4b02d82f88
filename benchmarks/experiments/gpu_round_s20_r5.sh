#!/usr/bin/env bash
# Session 20, GPU round 5 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s20_r5.sh
# Round 4: compiled by decoder block, dense prefill 17.3 ms (whole-model 18.8: its masked SDPA gone), but the
# structured models' compiled blocks still call their kernels' Python launchers per layer (Monarch eager host 13-30 ms
# per forward against 18 ms of GPU): compiled prefill ratios moved with the host (Monarch 1.26x, block-diagonal 1.23x
# where the whole-model compile gave 1.91x, 2:4 0.53x). A serving stack replays prefill from CUDA graphs (static
# shapes); inductor's reduce-overhead mode does that. Prediction: host cost gone, dense ~16 ms, Monarch >= 1.4x,
# low-rank ~1.6x, block-diagonal ~2x, 2:4 ~0.8x. (Round 4's kernel breakdown of the compiled blocks ran them
# uncompiled: its context closed on collection; fixed, not rerun for lack of device time.) Then bench kernels' rows at 1-16 tokens with
# the new cold columns (each call's weight from HBM, as in a model; the graph columns keep the weight in L2, which
# flatters a 32 MB dense weight: round 3 measured low-rank rank 512 of 2048->8192 at 1.14-1.16x cold where the hot
# graph column reads 0.96 / 0.86x).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step prefill 110 python3 -m structmat bench infer --structures monarch,lowrank,blockdiag,nm24 \
  --steps prefill_tps,prefill_compiled --prefill-compile-mode reduce-overhead --no-kernels --reps 5 \
  --budget-s 75 --out "$OUT/12"
step kernels 60 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 40
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
