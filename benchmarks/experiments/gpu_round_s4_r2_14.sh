#!/usr/bin/env bash
# Session 4, round 2, call 2 -- issue 14 on one H200, at most ~9.3 minutes, every step under its own timeout:
#   convert (SmolLM2 GGUF halves -> HF folder), budget (default `structmat compress` at 0.25/0.5/0.75, < 60 s
#   target), llama1b (1B-shape sequential offloaded peak), table (SmolLM2 perplexity rows, must-show rows first).
# Needs: part A parked by call 1 at /tmp/smol/model.gguf.aa, part B carried in .smolB/model.gguf.ab, gguf (and
# fla) wheels installed into /tmp/site by call 1. Writes only under "$OUT/14/". Issue 15's heal may run beside it:
# it can wait for /tmp/w/budget.done (touched after the budget timing, about 150-190 s in; the converted folder is
# /tmp/w/smollm2).
# Run from the repo root:  bash benchmarks/experiments/gpu_round_s4_r2_14.sh
set -u
t0=$(date +%s)
mkdir -p "$OUT/14"
log="$OUT/14/call.log"
ls -la /tmp/smol .smolB > "$log" 2>&1 || { echo "a GGUF half is missing" >> "$log"; exit 4; }
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$log" 2>&1
timeout 225 python3 benchmarks/compress_gpu.py --smollm2-gguf /tmp/smol/model.gguf.aa .smolB/model.gguf.ab \
  --work /tmp/w --stages convert,budget --timeouts convert=80,budget=135 --out "$OUT/14" \
  > "$OUT/14/convert-budget.log" 2>&1
echo "convert+budget rc=$? at +$(( $(date +%s) - t0 ))s" >> "$log"
mkdir -p /tmp/w; touch /tmp/w/budget.done  # issue 15's heal may start now: the budget timing ran alone on the GPU
timeout 110 python3 benchmarks/compress_gpu.py --work /tmp/w1b --stages llama1b --timeouts llama1b=95 --out "$OUT/14" \
  > "$OUT/14/llama1b.log" 2>&1
echo "llama1b rc=$? at +$(( $(date +%s) - t0 ))s" >> "$log"
[ -f /tmp/w/smollm2/config.json ] || { echo "no converted folder" >> "$log"; exit 5; }
left=$(( 555 - ($(date +%s) - t0) ))
[ "$left" -gt 60 ] || { echo "no time left for the table" >> "$log"; exit 6; }
timeout "$left" python3 benchmarks/compress_gpu.py --smollm2-folder /tmp/w/smollm2 --work /tmp/w2 --stages table \
  --timeouts table=$(( left - 15 )) --out "$OUT/14" > "$OUT/14/table.log" 2>&1
echo "table rc=$? at +$(( $(date +%s) - t0 ))s" >> "$log"
