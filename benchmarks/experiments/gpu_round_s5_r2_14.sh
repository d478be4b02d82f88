#!/usr/bin/env bash
# Session 5, round 2 -- issue 14 on one H200 (call B; carry .smolB), at most ~6.5 minutes, every step under its own
# timeout, writing only under "$OUT/14/":
#   1. convert (only if /tmp/w/smollm2 is gone), a one-time cache timed apart;
#   2. warm-up: a tiny `structmat compress` (one layer, 2 x 32 tokens) so that Python's bytecode cache holds every
#      module the budget command imports (the device image ships sources without .pyc files, which a pip install
#      would have compiled: 1,782 modules compiled at start-up took ~9 s of round 1's run); its wall time is the
#      cold start-up, recorded apart;
#   3. budget: the default `structmat compress` of SmolLM2 at 0.25/0.5/0.75 in ONE command (256 x 512 calibration
#      tokens, --device cuda), timed end to end from outside, ALONE on the GPU (target < 60 s); the command prints
#      each stage's synchronized wall time (kept in the JSON's stages_s);
#   4. then side by side (each in its own process; other work may share the GPU from here): the SmolLM2 table's
#      missing rows first (whitened Monarch, block-diagonal, the mix at 50 and 75%, data-free Monarch), then the
#      rest, <= ${TABLE_T:-200} s; and the 1B-shape sequential offloaded peak, <= ${LLAMA1B_T:-80} s.
# Needs (only without /tmp/w/smollm2): GGUF part A at /tmp/smol/model.gguf.aa, part B and the gguf wheel in .smolB.
# Run from the repo root:  OUT=$OUT bash benchmarks/experiments/gpu_round_s5_r2_14.sh
set -u
OUT=${OUT:?set OUT}
t0=$(date +%s)
mkdir -p "$OUT/14" /tmp/w /tmp/site /tmp/pyc
log="$OUT/14/call.log"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$log" 2>&1
stamp() { echo "$1 rc=$2 at +$(( $(date +%s) - t0 ))s" >> "$log"; }
now() { date +%s.%N; }
since() { python3 -c "print(round($(now) - $1, 1))"; }

# 1. convert (a one-time cache)
if [ ! -f /tmp/w/smollm2/config.json ]; then
  ls -la /tmp/smol .smolB >> "$log" 2>&1 || { echo "no converted folder and a GGUF half is missing" >> "$log"; exit 4; }
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site .smolB/gguf-*.whl >> "$log" 2>&1
  timeout 100 python3 benchmarks/compress_gpu.py --smollm2-gguf /tmp/smol/model.gguf.aa .smolB/model.gguf.ab \
    --work /tmp/w --stages convert --timeouts convert=90 --out "$OUT/14" > "$OUT/14/convert.log" 2>&1
  stamp convert $?
fi
[ -f /tmp/w/smollm2/config.json ] || { echo "no converted folder" >> "$log"; exit 5; }

# 2. warm-up (cold start-up, timed apart)
w0=$(now)
timeout 90 python3 -m structmat compress --model /tmp/w/smollm2 --target-params 0.5 --calib-samples 2 --seq-len 32 \
  --layers '.*layers\.0\.mlp\.down_proj' --no-eval --device cuda --out /tmp/w/warm \
  > "$OUT/14/warmup.log" 2>&1
rc=$?
echo "warm-up (cold imports + a one-layer compress) wall $(since $w0) s" >> "$log"
stamp warmup $rc

# 3. the budget command, timed alone (its own limit ${BUDGET_T:-100} s sits 20 s inside the stage's)
timeout $(( ${BUDGET_T:-100} + 40 )) python3 benchmarks/compress_gpu.py --smollm2-folder /tmp/w/smollm2 \
  --work /tmp/w2 --stages budget --timeouts budget=$(( ${BUDGET_T:-100} + 20 )) --out "$OUT/14" \
  > "$OUT/14/budget.log" 2>&1
stamp budget $?
touch /tmp/w/budget2.done  # the timing is over: other work may share the GPU now

# 4. the table and the 1B peak, side by side
timeout $(( ${TABLE_T:-200} + 10 )) python3 benchmarks/compress_gpu.py --smollm2-folder /tmp/w/smollm2 --work /tmp/w3 \
  --stages table --timeouts table=${TABLE_T:-200} --out "$OUT/14" --table-rows "whitened Monarch@0.5,\
block-diagonal@0.5,budget mix@0.5,budget mix@0.75,Monarch@0.5,N:M SparseGPT@0.5,whitened SVD@0.5,N:M Wanda@0.5,\
N:M SparseGPT@0.5:sequential,budget mix@0.25,SVD@0.5,ASVD@0.5" > "$OUT/14/table.log" 2>&1 &
table=$!
sleep 2  # a different timestamp for its JSON than the table's
timeout $(( ${LLAMA1B_T:-80} + 10 )) python3 benchmarks/compress_gpu.py --work /tmp/w1b --stages llama1b \
  --timeouts llama1b=${LLAMA1B_T:-80} --out "$OUT/14" > "$OUT/14/llama1b.log" 2>&1
stamp llama1b $?
rm -rf /tmp/w1b
wait $table
stamp table $?
