#!/usr/bin/env bash
# Session 27, GPU call C (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s27_c.sh
# Call B: `--loop graph --compile inductor` low-rank at batch 8 only 1.19x dense (32: 1.08x) where block-diagonal
# keeps 1.88x (1.74x); low-rank's step 0.47 ms at batch 1 but 0.87 ms at 8 (dense 0.73 -> 0.98), and it held 31 MiB
# more than at batch 1 (a cuBLAS workspace: at 8 tokens the cost model gives the fused gate/up group's product,
# 33.5 MB of factors, to cuBLAS's two GEMMs, ~20 us predicted, over the decode kernels, ~23 us).
# Prediction: the compiled step's kernels at batch 8 show the cuBLAS products of the low-rank groups (or inductor's
# handling of their strided bmm) far above the ~20 us a group the cost model assumes; forcing the decode kernels
# (STRUCTMAT_BACKEND=decode) should bring the step near batch 1's 0.47 ms + the attention's growth (~0.55 ms).
# Then Monarch and 2:4 at batch 8 through `structmat generate` (the batch-8 row for every structure).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step prof-b8 200 python3 benchmarks/experiments/step_profile.py --out "$STEP_DIR" --batch 8 --compile \
  --models dense,lowrank+fused,monarch+fused
step prof-b8-decode 120 env STRUCTMAT_BACKEND=decode python3 benchmarks/experiments/step_profile.py \
  --out "$STEP_DIR/decode" --batch 8 --compile --models lowrank+fused,monarch+fused
D=$PWD/out/s27-folders
[ -d "$D/nm24" ] || step folders 120 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda
step loop-compiled-lowrank-b8-decode 90 env STRUCTMAT_BACKEND=decode python3 -m structmat generate \
  --model "$D/lowrank" --baseline "$D/dense" --prompt "w5 w6 w7 w8" --max-new-tokens 64 --rounds 3 --batch 8 \
  --loop graph --compile inductor --json "$STEP_DIR/generate-lowrank-loop-compiled-b8-decode.json"
for s in monarch nm24; do
  step "loop-compiled-$s-b8" 90 python3 -m structmat generate --model "$D/$s" --baseline "$D/dense" \
    --prompt "w5 w6 w7 w8" --max-new-tokens 64 --rounds 3 --batch 8 --loop graph --compile inductor \
    --json "$STEP_DIR/generate-$s-loop-compiled-b8.json"
done
exit 0
