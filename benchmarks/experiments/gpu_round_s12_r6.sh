#!/usr/bin/env bash
# Session 12, GPU round 6 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r6.sh
# Round 5: no variant of the 2:4 dense tile width / input pipeline or of the gemv kernel's warps / stages / reduction
# tile beat the defaults. The final kernel rows under graphs with session 12's defaults (low-rank above one token:
# its decode kernels below ~9.5 MB of weight, cuBLAS above), and the 2:4 / low-rank captured steps at batch 1 / 8.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step kernels 120 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,lowrank+fused,nm24+fused --graph-batches 1,8 --eager-models "" --generate-models "" \
  --step-compile dense,lowrank+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
