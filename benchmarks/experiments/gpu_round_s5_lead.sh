#!/usr/bin/env bash
# Session 5 (2026-12-03 afternoon): the lead's device calls, as run, each from the repo root of main's checkout on a
# warm H200 (/tmp survives between calls made back to back; only 8 files come back from a call, so each issue packs
# one tgz). Usage: CALL=r1a|r1b|r1c|r2a|r2b OUT=$OUT bash benchmarks/experiments/gpu_round_s5_lead.sh
#   r1a  carry .smolA   park GGUF half A, then issue 12's round 1 (decode floor, per-layer candidates, Monarch)
#   r1b  carry .smolB   issue 14's round 1 (convert, budget under cProfile, pricing per layer, 1B peak); leaves
#                       /tmp/w/smollm2 and /tmp/w/mix50 for issue 15
#   r1c  (nothing)      issue 15's round 1 (adapter table, heal of /tmp/w/mix50), alone on the GPU
#   r2a  carry .smolA   park GGUF half A (fresh machine), then issue 12's round 2 (all ratios in one process)
#   r2b  carry .smolB   issue 14's round 2 (convert, warm-up, budget timed alone, then table + 1B peak) with issue
#                       15's adapter table started once the budget timing is over (/tmp/w/budget2.done). As run
#                       at 15:54Z it had LLAMA1B_T=70 and an outer timeout of 440 s, which cut the 1B stage (it
#                       needs ~76 s): the default is 95 now.
set -u
OUT=${OUT:?set OUT}
park() { mkdir -p /tmp/smol && cp .smolA/model.gguf.aa /tmp/smol/ && ls -la /tmp/smol > "$OUT/park.log"; }
case "${CALL:?set CALL}" in
  r1a) park; timeout 225 bash benchmarks/experiments/gpu_round_s5_r1_12.sh ;;
  r1b) timeout 570 bash benchmarks/experiments/gpu_round_s5_r1_14.sh; tar -czf "$OUT/14.tgz" -C "$OUT" 14 && rm -rf "$OUT/14" ;;
  r1c) timeout 530 bash benchmarks/experiments/gpu_round_s5_r1_15.sh ;;
  r2a) park; timeout 95 bash benchmarks/experiments/gpu_round_s5_r2_12.sh ;;
  r2b) ( s=$(date +%s)
         while [ ! -f /tmp/w/budget2.done ] && [ $(( $(date +%s) - s )) -lt 260 ]; do sleep 2; done
         [ -f /tmp/w/budget2.done ] && timeout 205 bash benchmarks/experiments/gpu_round_s5_r2_15.sh ) &
       TABLE_T=150 LLAMA1B_T=${LLAMA1B_T:-95} timeout 470 bash benchmarks/experiments/gpu_round_s5_r2_14.sh; wait
       tar -czf "$OUT/14.tgz" -C "$OUT" 14 && rm -rf "$OUT/14" ;;
  *) echo "CALL: one of r1a r1b r1c r2a r2b"; exit 2 ;;
esac
