#!/usr/bin/env bash
# Session 6, GPU rounds 2-4 (one H200, nothing carried), from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s6_r2.sh                                  (round 2)
#   LAYERS=lowrank,monarch MODELS=dense,lowrank,monarch OUT=$OUT bash benchmarks/experiments/gpu_round_s6_r2.sh  (3, 4)
# Issue 12, the one-launch decode kernels (_triton_decode._decode_fused):
#   1. correctness on the GPU first (a hang or race would show here, under its own limit): the decode kernels vs
#      the reference (bf16/fp16/fp32, 1-64 tokens) and the bit-for-bit repeat test of the fused two-stage kernels;
#   2. per layer (decode_layers.py): every candidate at 1 and 16 tokens, cold/hot/eager, with the fused kernel's
#      variants and the older two-launch form (decode@two) beside it;
#   3. the decode step of the bench-infer model at batch 1 with the decode kernels forced (STRUCTMAT_BACKEND=decode):
#      captured eager step and inductor-compiled step, dense and every structure in one process.
set -u
: "${OUT:?set OUT}"
mkdir -p "$OUT/12"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
t=$(date +%s)
timeout 150 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_inference.py -k "decode" \
  > "$OUT/12/gpu-tests.log" 2>&1
echo "gpu-tests rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"; t=$(date +%s)
timeout 120 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures "${LAYERS:-lowrank,monarch,blockdiag}" \
  > "$OUT/12/layers.log" 2>&1
echo "layers rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"; t=$(date +%s)
STRUCTMAT_BACKEND=decode timeout 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models "${MODELS:-dense,lowrank,monarch,blockdiag,nm24}" --graph-batches 1 --eager-models "" --generate-models "" \
  --step-compile "${MODELS:-dense,lowrank,monarch,blockdiag,nm24}" > "$OUT/12/floor-decode.log" 2>&1
echo "floor-decode rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"
exit 0
