#!/usr/bin/env bash
# Session 6, GPU round 5 (the last: one H200, nothing carried), from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s6_r5.sh
# In the order of what matters, each step under its own limit (a cut round keeps the steps before the cut):
#   1. issue 14: the 1B-shape sequential offloaded peak (gpu_round_s6_14.sh);
#   2. issue 12: the decode kernels on the GPU (vs the reference in bf16 and fp32 at 1-64 tokens; the one-launch
#      kernel's bit-for-bit repeats, eager and from a CUDA graph);
#   3. issue 12: the shipped dispatch (auto) in one process: captured eager step, inductor-compiled step (then
#      captured) and eager HF generate at batch 1, dense and every structure;
#   4. issue 12: low-rank per layer at one token (decode_layers.py: the one-launch kernel and its variants, polling
#      by volatile loads among them, beside the two-launch form and cuBLAS);
#   5. issue 12: the `structmat compress` checkpoint (low-rank whitened 50% of the bench shape, 16 calibration
#      samples) reloaded by load_pretrained, through `structmat bench infer` at batch 1 beside nothing else.
set -u
: "${OUT:?set OUT}"
mkdir -p "$OUT/12"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2 t=$(date +%s)
  shift 2
  timeout --kill-after=5 "$secs" "$@" > "$OUT/12/$name.log" 2>&1
  echo "$name rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"
}
t=$(date +%s); bash benchmarks/experiments/gpu_round_s6_14.sh; echo "14 rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"
step gpu-tests 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_inference.py \
  -k "bit_for_bit or (decode_kernels_match_reference_gpu and (bfloat16 or float32))"
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,lowrank,monarch,blockdiag,nm24 --graph-batches 1 --eager-models dense,lowrank,monarch,blockdiag,nm24 \
  --generate-models "" --step-compile dense,lowrank,monarch,blockdiag,nm24
step layers 40 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures lowrank --tokens 1
step ckpt-build 80 python3 benchmarks/infer_checkpoint.py --work /tmp/ckpt --calib-samples 16 --tokenizer-files 100
CK=$(ls -d /tmp/ckpt/compressed/target-* 2>/dev/null | head -1)
step ckpt-infer 60 python3 -m structmat.bench.infer --no-dense --structures "" --checkpoint "${CK:-/tmp/ckpt/none}" \
  --batches 1 --eager-batches 1 --compiled-batches 1 --new-tokens 32 --reps 2 --compile-backend cudagraphs \
  --step-compile-mode default --no-kernels --out "$OUT/12"
exit 0
