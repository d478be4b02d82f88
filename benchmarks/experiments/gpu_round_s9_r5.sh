#!/usr/bin/env bash
# Session 9, GPU round 5 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s9_r5.sh
# The product command on the fused models: `structmat bench infer` (one model per process, the flags of
# gpu_round_infer.sh, no per-layer rows) for dense and every structure with fuse_siblings (q/k/v and gate/up as one
# product each, the gated MLP as two products), merged; then a second interleaved eager sample (9 rounds).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
MODELS="dense lowrank+fused monarch+fused blockdiag+fused nm24+fused" SKIP_EXTRA=1 KERNELS=0 T_MODEL=62 \
  bash benchmarks/experiments/gpu_round_infer.sh
M=dense,lowrank,lowrank+fused,monarch,monarch+fused,blockdiag,blockdiag+fused,nm24,nm24+fused
step eager 75 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-interleaved "$M" --eager-rounds 9
exit 0
