#!/usr/bin/env bash
# Session 4 (2026-12-03 afternoon), round 2, call 2 (carry .smolB), right after call 1 parked GGUF part A in /tmp:
# issue 14's stages (benchmarks/experiments/gpu_round_s4_r2_14.sh: convert, budget timing, 1B peak, SmolLM2 table) and,
# once the budget timing is over (so that it is timed alone on the GPU), issue 15's SmolLM2 compress + heal + adapter
# table beside them. Results packed into $OUT/14.tgz and $OUT/15.tgz (8 files at most come back from a call).
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s4_r2_call2.sh
set -u
OUT=${OUT:?set OUT}
t0=$(date +%s)
mkdir -p "$OUT/14" "$OUT/15"
(  # issue 15: wait for the budget timing to end (issue 14's script touches /tmp/w/budget.done; 240 s at most)
  while [ ! -f /tmp/w/budget.done ] && [ $(( $(date +%s) - t0 )) -lt 240 ]; do sleep 2; done
  [ -f /tmp/w/smollm2/config.json ] || { echo "no converted folder" > "$OUT/15/heal.log"; exit 5; }
  left=$(( ${CALL2_T:-560} - ($(date +%s) - t0) - 10 ))
  echo "heal starts at +$(( $(date +%s) - t0 ))s with ${left}s" > "$OUT/15/heal.log"
  PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 timeout "$left" python3 benchmarks/smollm2_heal.py --model /tmp/w/smollm2 \
    --out "$OUT/15" --total-seconds $(( left - 20 )) --price-seconds ${PRICE_S:-70} --heal-seconds ${HEAL_S:-170} \
    --table-seconds ${TABLE_S:-12} >> "$OUT/15/heal.log" 2>&1
  echo "heal rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/15/heal.log"
) &
heal=$!
bash benchmarks/experiments/gpu_round_s4_r2_14.sh
echo "issue 14 script rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/14/call.log"
wait $heal
tar -czf "$OUT/14.tgz" -C "$OUT" 14 && rm -rf "$OUT/14"
tar -czf "$OUT/15.tgz" -C "$OUT" 15 && rm -rf "$OUT/15"
