#!/usr/bin/env bash
# Session 5, round 2, issue 15: the whole adapter table in one run, every row the same 36 steps x 32 x 512 tokens
# (589,824 tokens, 0.96 x round 1's 150 x 8 x 512 = 614,400): round 1 showed the step host-bound (~0.35 s at 8 and at
# 16 sequences, so time per step barely depends on the batch), so a 4x larger batch at 4x fewer steps trains on the
# same tokens in about a quarter of the time. Rows never measured run first, Compacter (the most memory) last.
# Run from the repo root of main's checkout on the device, after /tmp/w/smollm2 exists (issue 14's conversion):
#   OUT=$OUT GIT_SHA=<main sha> bash benchmarks/experiments/gpu_round_s5_r2_15.sh      (wall <= 200 s: T_TABLE)
# May share the GPU with issue 14's table: nvidia-smi's list of compute processes is logged every 5 s (gpu-apps.csv)
# and every row records its start and end (unix time), so the overlap can be read off. Writes only under $OUT/15,
# packed into $OUT/15.tgz. MODEL / EXTRA (more flags, last wins) are for the CPU rehearsal with a tiny Llama.
set -u
OUT=${OUT:?set OUT}
t0=$(date +%s)
mkdir -p "$OUT/15"
log="$OUT/15/round.log"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
{ date -u; echo "main at ${GIT_SHA:-? (not given; the git data of the device copy is stale)}"; echo "start unix $t0"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv; } > "$log" 2>&1
MODEL=${MODEL:-/tmp/w/smollm2}
[ -f "$MODEL/config.json" ] || { echo "no converted folder $MODEL: nothing run" >> "$log"; exit 5; }
( while :; do nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null \
    | sed "s/^/$(date +%s), /"; sleep 5; done ) > "$OUT/15/gpu-apps.csv" 2>&1 &
watch=$!
T_TABLE=${T_TABLE:-200}
timeout "$T_TABLE" python3 benchmarks/smollm2_heal.py --model "$MODEL" --out "$OUT/15" --parts table \
  --methods randbasis,ldu,rows,splr,full,lora,pissa,rslora,kron --rank 8 --table-steps 36 --batch-size 32 \
  --seq-len 512 --total-seconds $(( T_TABLE - 8 )) ${EXTRA:-} > "$OUT/15/table.log" 2>&1
echo "table rc=$? at +$(( $(date +%s) - t0 ))s" >> "$log"
kill "$watch" 2>/dev/null
tar -czf "$OUT/15.tgz" -C "$OUT" 15 && rm -rf "$OUT/15"
