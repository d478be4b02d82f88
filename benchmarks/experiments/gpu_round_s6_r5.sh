#!/usr/bin/env bash
# Session 6, GPU round 5 (one H200, nothing carried), from the repo root:  OUT=$OUT bash benchmarks/experiments/gpu_round_s6_r5.sh
# (<= 600 s; issue 14's 1B peak runs apart: gpu_round_s6_14.sh)
#   1. the decode kernels on the GPU (vs the reference in bf16/fp16/fp32 at 1-64 tokens, and the one-launch kernel's
#      bit-for-bit repeats, eager and from a CUDA graph);
#   2. low-rank per layer at one token (decode_layers.py: the one-launch kernel, its variants, polling by volatile
#      loads among them, and the two-launch form);
#   3. the shipped dispatch (auto) in one process: captured eager step, inductor-compiled step (then captured) and
#      eager HF generate at batch 1, dense and every structure;
#   4. the `structmat compress` checkpoint (low-rank whitened 50% of the bench shape) reloaded by load_pretrained,
#      through `structmat bench infer` beside dense (gpu_round_infer.sh with CKPT=1).
set -u
: "${OUT:?set OUT}"
mkdir -p "$OUT/12"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
t=$(date +%s)
timeout 150 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_inference.py -k "decode" \
  > "$OUT/12/gpu-tests.log" 2>&1
echo "gpu-tests rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"; t=$(date +%s)
timeout 40 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank --tokens 1 \
  > "$OUT/12/layers.log" 2>&1
echo "layers rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"; t=$(date +%s)
timeout 170 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,lowrank,monarch,blockdiag,nm24 --graph-batches 1 --eager-models dense,lowrank,monarch,blockdiag,nm24 \
  --generate-models "" --step-compile dense,lowrank,monarch,blockdiag,nm24 > "$OUT/12/floor.log" 2>&1
echo "floor rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"; t=$(date +%s)
MODELS=dense SKIP_EXTRA=1 CKPT=1 KERNELS=0 HISTORY=0 bash benchmarks/experiments/gpu_round_infer.sh
echo "ckpt rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"
tar -czf "$OUT/12.tgz" -C "$OUT" 12 && rm -rf "$OUT/12"
exit 0
