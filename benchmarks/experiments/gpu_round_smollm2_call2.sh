#!/usr/bin/env bash
# Lead's round, call 2: SmolLM2 from the two GGUF parts (A parked by call 1, B carried now); issue 14's conversion and
# budget timing alone on the GPU, then issue 14's table + 1B stage beside issue 15's compress/heal/adapter table.
set -u
t0=$(date +%s)
ls -la /tmp/smol > "$OUT/call2.log" 2>&1 || { echo "part A missing: machine was not kept warm" >> "$OUT/call2.log"; exit 4; }
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
python3 -c "import gguf, accelerate; print('gguf', gguf.__version__ if hasattr(gguf,'__version__') else '?')" >> "$OUT/call2.log" 2>&1
mkdir -p "$OUT/14" "$OUT/15"
timeout 200 python3 benchmarks/compress_gpu.py --smollm2-gguf /tmp/smol/model.gguf.aa .smolB/model.gguf.ab --work /tmp/w \
  --stages convert,budget --timeouts convert=80,budget=110 --out "$OUT/14" > "$OUT/14/convert-budget.log" 2>&1
echo "convert+budget rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/call2.log"
[ -f /tmp/w/smollm2/config.json ] || { echo "no converted folder" >> "$OUT/call2.log"; exit 5; }
timeout ${HEAL_T:-232} python3 benchmarks/smollm2_heal.py --model /tmp/w/smollm2 --out "$OUT/15" --total-seconds 215 > "$OUT/15/heal.log" 2>&1 &
heal=$!
timeout 220 python3 benchmarks/compress_gpu.py --smollm2-folder /tmp/w/smollm2 --work /tmp/w2 --stages table,llama1b \
  --timeouts table=125,llama1b=85 --out "$OUT/14" > "$OUT/14/table-1b.log" 2>&1
echo "table+1b rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/call2.log"
wait $heal
echo "heal rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/call2.log"
