#!/usr/bin/env bash
# Session 5, round 2 -- issue 14 on one H200, at most ~9.5 minutes, every step under its own timeout, writing only
# under "$OUT/14/":
#   1. convert (only if /tmp/w/smollm2 is gone: a fresh machine), a one-time cache timed apart;
#   2. budget: the default `structmat compress` of SmolLM2 at 0.25/0.5/0.75 in ONE command (256 x 512 calibration
#      tokens, --device cuda), timed end to end from outside, ALONE on the GPU (target < 60 s); the command prints
#      each stage's synchronized wall time (kept in the JSON's stages_s);
#   3. table: the SmolLM2 perplexity table, the rows the last table lacked first (whitened Monarch, block-diagonal,
#      data-free Monarch at 50%, the mix at 75%), then the rest for one same-run table, beside the dense perplexity;
#   4. llama1b (only with LLAMA1B=1): the 1B-shape sequential offloaded peak.
# Needs (only on a fresh machine): GGUF part A at /tmp/smol/model.gguf.aa, part B and the gguf wheel in .smolB.
# Run from the repo root:  OUT=$OUT bash benchmarks/experiments/gpu_round_s5_r2_14.sh
set -u
OUT=${OUT:?set OUT}
t0=$(date +%s)
mkdir -p "$OUT/14" /tmp/w /tmp/site
log="$OUT/14/call.log"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$log" 2>&1
stamp() { echo "$1 rc=$2 at +$(( $(date +%s) - t0 ))s" >> "$log"; }

if [ ! -f /tmp/w/smollm2/config.json ]; then
  ls -la /tmp/smol .smolB >> "$log" 2>&1 || { echo "no converted folder and a GGUF half is missing" >> "$log"; exit 4; }
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site .smolB/gguf-*.whl >> "$log" 2>&1
  timeout 100 python3 benchmarks/compress_gpu.py --smollm2-gguf /tmp/smol/model.gguf.aa .smolB/model.gguf.ab \
    --work /tmp/w --stages convert --timeouts convert=90 --out "$OUT/14" > "$OUT/14/convert.log" 2>&1
  stamp convert $?
fi
[ -f /tmp/w/smollm2/config.json ] || { echo "no converted folder" >> "$log"; exit 5; }

# 2. the budget command, timed alone (its own limit ${BUDGET_T:-120} s sits 20 s inside the stage's)
timeout $(( ${BUDGET_T:-120} + 40 )) python3 benchmarks/compress_gpu.py --smollm2-folder /tmp/w/smollm2 \
  --work /tmp/w2 --stages budget --timeouts budget=$(( ${BUDGET_T:-120} + 20 )) --out "$OUT/14" \
  > "$OUT/14/budget.log" 2>&1
stamp budget $?
[ -d /tmp/w2/smollm2-budget/target-0.50 ] && ln -sfn /tmp/w2/smollm2-budget/target-0.50 /tmp/w/mix50r2
touch /tmp/w/budget2.done  # the timing is over: other work may share the GPU now

# 3. the table (must-show rows first), with what is left of the call's budget
left=$(( ${CALL_T:-560} - ($(date +%s) - t0) - ${LLAMA1B_T:-0} ))
if [ "$left" -gt 60 ]; then
  timeout "$left" python3 benchmarks/compress_gpu.py --smollm2-folder /tmp/w/smollm2 --work /tmp/w3 --stages table \
    --timeouts table=$(( left - 15 )) --out "$OUT/14" --table-rows "whitened Monarch@0.5,block-diagonal@0.5,\
Monarch@0.5,budget mix@0.75,budget mix@0.5,N:M SparseGPT@0.5,N:M Wanda@0.5,whitened SVD@0.5,\
N:M SparseGPT@0.5:sequential,budget mix@0.5:sequential,budget mix@0.25,SVD@0.5,ASVD@0.5" \
    > "$OUT/14/table.log" 2>&1
  stamp table $?
else
  echo "no time left for the table ($left s)" >> "$log"
fi

# 4. optional: the 1B-shape peak again (LLAMA1B=1, LLAMA1B_T seconds reserved)
if [ "${LLAMA1B:-0}" = 1 ]; then
  timeout "${LLAMA1B_T:-110}" python3 benchmarks/compress_gpu.py --work /tmp/w1b --stages llama1b \
    --timeouts llama1b=$(( ${LLAMA1B_T:-110} - 15 )) --out "$OUT/14" > "$OUT/14/llama1b.log" 2>&1
  stamp llama1b $?
  rm -rf /tmp/w1b
fi
