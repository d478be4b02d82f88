#!/usr/bin/env bash
# Session 5, round 1 -- issue 14 on one H200: a DIAGNOSIS of the budget compress (< 60 s target, last cut at 135 s),
# at most ~8 minutes, every step under its own timeout, writing only under "$OUT/14/":
#   1. convert: the SmolLM2 GGUF halves -> HF folder /tmp/w/smollm2 (a one-time cache, timed apart);
#   2. budget: the default `structmat compress` at 0.25/0.5/0.75 (256 x 512 calibration tokens, --device cuda) under
#      cProfile, stopped by SIGINT at its limit (cProfile writes its profile in a `finally`, so a cut run keeps it);
#      the command prints each stage's synchronized wall time as it goes (loaded, tokenized, calibrated, priced --
#      split per structure --, sensitivities, then per target solved, projected, saved, evaluated); leaves the 50%
#      model at /tmp/w/mix50 for issue 15;
#   3. pricing: CUDA-synchronized seconds and aten-op counts per layer and structure for the pricing calls and the
#      50% projections of SmolLM2 block 5 (benchmarks/pricing_profile.py --device cuda --project);
#   4. llama1b: the 1B-shape sequential offloaded peak, with the in-place Cholesky of the whitening factor.
# Needs: part A of the GGUF parked at /tmp/smol/model.gguf.aa (the lead's call A), part B and the gguf wheel carried
# in .smolB. Run from the repo root:  OUT=$OUT bash benchmarks/experiments/gpu_round_s5_r1_14.sh
set -u
OUT=${OUT:?set OUT}
t0=$(date +%s)
mkdir -p "$OUT/14" /tmp/w /tmp/site
log="$OUT/14/call.log"
ls -la /tmp/smol .smolB > "$log" 2>&1 || { echo "a GGUF half is missing" >> "$log"; exit 4; }
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .smolB/gguf-*.whl >> "$log" 2>&1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$log" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$log" 2>&1
stamp() { echo "$1 rc=$2 at +$(( $(date +%s) - t0 ))s" >> "$log"; }

# 1. convert (a one-time cache)
if [ ! -f /tmp/w/smollm2/config.json ]; then
  timeout 100 python3 benchmarks/compress_gpu.py --smollm2-gguf /tmp/smol/model.gguf.aa .smolB/model.gguf.ab \
    --work /tmp/w --stages convert --timeouts convert=90 --out "$OUT/14" > "$OUT/14/convert.log" 2>&1
  stamp convert $?
fi
[ -f /tmp/w/smollm2/config.json ] || { echo "no converted folder" >> "$log"; exit 5; }

# 2. the budget command under cProfile (SIGINT at the limit keeps the profile)
b0=$(date +%s.%N)
timeout -s INT -k 15 ${BUDGET_T:-200} python3 -m cProfile -o "$OUT/14/budget.prof" -m structmat compress \
  --model /tmp/w/smollm2 --target-params 0.25 0.5 0.75 --calib-samples 256 --seq-len 512 --device cuda \
  --out /tmp/w/budget > "$OUT/14/budget.out" 2> "$OUT/14/budget.err"
rc=$?
echo "budget wall $(python3 -c "print(round($(date +%s.%N) - $b0, 1))") s (under cProfile)" >> "$log"
stamp budget $rc
[ -d /tmp/w/budget/target-0.50 ] && ln -sfn /tmp/w/budget/target-0.50 /tmp/w/mix50 && echo "mix50 ready" >> "$log"
touch /tmp/w/budget.done  # issue 15 may start on /tmp/w/mix50 now
tr '\r' '\n' < "$OUT/14/budget.err" | grep -v "it/s\]$\|s/it\]$\|layer/s\]$\|s/layer\]$" | tail -80 \
  > "$OUT/14/budget-stages.txt"
[ -f "$OUT/14/budget.prof" ] && timeout 30 python3 -c "
import pstats, sys
p = pstats.Stats('$OUT/14/budget.prof', stream=sys.stdout)
p.sort_stats('tottime').print_stats(45)
p.sort_stats('cumulative').print_stats(70)" > "$OUT/14/budget-profile.txt" 2>&1

# 3. pricing and projection per layer, CUDA-synchronized (block 5)
timeout ${PRICING_T:-100} python3 benchmarks/pricing_profile.py --model /tmp/w/smollm2 --device cuda --blocks 5 \
  --calib-samples 64 --seq-len 512 --project --out "$OUT/14" > "$OUT/14/pricing.log" 2>&1
stamp pricing $?

# 4. the 1B-shape sequential offloaded peak (in-place Cholesky)
timeout 110 python3 benchmarks/compress_gpu.py --work /tmp/w1b --stages llama1b --timeouts llama1b=95 --out "$OUT/14" \
  > "$OUT/14/llama1b.log" 2>&1
stamp llama1b $?
rm -rf /tmp/w1b
