#!/usr/bin/env bash
# Session 6, round 2 -- issue 14 on one H200, at most ~135 s, writing only under "$OUT/14/": the 1B-shape sequential
# offloaded compression (hidden 2048, SwiGLU 8192, 16 layers, random bf16 weights written as safetensors shards;
# lowrank@whitened 0.5, 128 x 512 calibration tokens in batches of 8, block forwards in pieces of 1024 tokens), its
# peak GPU memory per stage against the resident terms from the shapes and the working sets measured apart.
# Needs nothing carried (no GGUF). Run from the repo root:  OUT=$OUT bash benchmarks/experiments/gpu_round_s6_14.sh
set -u
OUT=${OUT:?set OUT}
mkdir -p "$OUT/14" /tmp/pyc
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
log="$OUT/14/call.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$log" 2>&1
git log -1 --format='checkout %h %s' >> "$log" 2>&1 || true
t0=$(date +%s)
timeout 130 python3 benchmarks/compress_gpu.py --work /tmp/w1b --stages llama1b --timeouts llama1b=110 \
  --out "$OUT/14" > "$OUT/14/llama1b.log" 2>&1
echo "llama1b rc=$? s=$(( $(date +%s) - t0 ))" >> "$log"
