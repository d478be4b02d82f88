#!/usr/bin/env bash
# Session 5, round 1, issue 15 (run from the repo root of main's checkout on the device, after issue 14's round-1 step
# has converted SmolLM2 into /tmp/w/smollm2; nothing carried):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s5_r1_15.sh          (wall budget ~480 s: table <= 300, heal <= 185)
# 1. The adapter table, every row the same 150 steps x 8 x 512 tokens of site-packages code (no per-row time cut):
#    LoRA, PiSSA, rsLoRA, Compacter (kron), NOLA/RandLoRA (randbasis), LoLDU, S2FT rows, sparse+low-rank, full FT.
#    A row that would not fit in what is left of --total-seconds is skipped whole (the JSON says so).
# 2. SmolLM2 heal of the budget solver's default-mix 50% model that issue 14's round-1 budget command leaves in
#    /tmp/w/mix50 (STUDENT=... to point elsewhere); skipped, with a line in the log, when it is absent.
# Writes only under $OUT/15 and packs it into $OUT/15.tgz. T_TABLE / T_HEAL override the two limits (seconds); MODEL
# and EXTRA (more flags, last wins) are for the CPU rehearsal with a tiny Llama; GIT_SHA (main's sha) goes into the log.
set -u
OUT=${OUT:?set OUT}
t0=$(date +%s)
mkdir -p "$OUT/15"
log="$OUT/15/round.log"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
{ date -u; echo "main at ${GIT_SHA:-? (not given; the git data of the device copy is stale)}"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv; python3 -c "import sys, sysconfig;
print(sys.version.split()[0], sysconfig.get_paths()['purelib'])"; } > "$log" 2>&1
MODEL=${MODEL:-/tmp/w/smollm2}
[ -f "$MODEL/config.json" ] || { echo "no converted folder $MODEL: nothing run" >> "$log"; exit 5; }
T_TABLE=${T_TABLE:-300}
timeout "$T_TABLE" python3 benchmarks/smollm2_heal.py --model "$MODEL" --out "$OUT/15" --parts table \
  --methods lora,pissa,rslora,kron,randbasis,ldu,rows,splr,full --rank 8 --table-steps 150 --batch-size 8 \
  --seq-len 512 --total-seconds $(( T_TABLE - 15 )) ${EXTRA:-} > "$OUT/15/table.log" 2>&1
echo "table rc=$? at +$(( $(date +%s) - t0 ))s" >> "$log"
STUDENT=${STUDENT:-/tmp/w/mix50}
# issue 14's budget step may still be writing it: wait up to WAIT_STUDENT seconds (save_pretrained writes
# structmat.json last)
while [ ! -f "$STUDENT/structmat.json" ] && [ $(( $(date +%s) - t0 )) -lt $(( T_TABLE + ${WAIT_STUDENT:-60} )) ]; do
  sleep 2; done
if [ -f "$STUDENT/structmat.json" ]; then
  T_HEAL=${T_HEAL:-185}
  timeout "$T_HEAL" python3 benchmarks/smollm2_heal.py --model "$MODEL" --student "$STUDENT" --out "$OUT/15" \
    --parts compress,heal --heal-steps 400 --heal-seconds 110 --batch-size 16 --seq-len 512 \
    --total-seconds $(( T_HEAL - 10 )) ${EXTRA:-} ${EXTRA_HEAL:-} > "$OUT/15/heal.log" 2>&1
  echo "heal rc=$? at +$(( $(date +%s) - t0 ))s" >> "$log"
else
  echo "no student at $STUDENT (issue 14's budget step did not leave it): heal not run" >> "$log"
fi
nvidia-smi --query-gpu=memory.used --format=csv >> "$log" 2>&1
tar -czf "$OUT/15.tgz" -C "$OUT" 15 && rm -rf "$OUT/15"
