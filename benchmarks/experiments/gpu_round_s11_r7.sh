#!/usr/bin/env bash
# Session 11, GPU round 7 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r7.sh
# 2:4 above one token: the expanded-tile kernel's expansion by shifts in inline PTX (a group's values as one word,
# its positions as one half-word) and, where tiles are whole, no element masks (vectorized loads): sm_90 SASS loop
# 711 -> 488 instructions (compare-and-select with whole tiles: 569). Predicted: 2:4 at 4-16 tokens 20-35% faster
# (16 tokens 8.0 / 17.5 / 20.1 us -> ~6 / 12-13 / 14-15; dense 6.1 / 10.7 / 13.7), batch 8/32 steps 0.84-0.88x ->
# ~0.95x. The GPU tests (the shift form against float64, bit-for-bit repeats), the 2:4 layers at 1/4/16 tokens with
# and without the shifts, the 2:4 model steps, and `structmat bench kernels` rows at 1-16 tokens under graphs.
# Outcome: no gain (16 tokens 8.3 / 17.2 / 20.8 us, compare-and-select 8.3 / 19.7 / 21.0; steps as round 4) and the
# direct-launch GPU test failed for the new form at 16 tokens (its second call differed from its first: not found);
# the form was dropped, so on main this script runs without the shift variant (decode@noprmt no longer exists).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch"
step layers 100 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 --tokens 1,4,16 \
  --variants-only decode@nosplit
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --graph-batches 1,8,32 --eager-models "" --generate-models "" --step-compile dense,nm24,nm24+fused
step kernels 90 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 70
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
