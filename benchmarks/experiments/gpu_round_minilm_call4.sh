#!/usr/bin/env bash
# Issue 15, GPU round 2, call 4 of 4 (carry .mlB), right after call 3 (gpu_round_minilm_call3.sh, carry .mlA) parked
# the first half of MiniLM's model.safetensors in /tmp/minilm. Joins the halves (size + md5 checked), then on cuda:
#   1. structmat compress --target-params 0.5: the budget solver's 50% student (its cosine / top-1: compress.json);
#   2. benchmarks/heal_minilm.py: adapters <= 2% of the 36 linear weights (trained LayerNorms/biases counted in it),
#      EoRA alone at step 0, `structmat heal`'s loop for as much time as is left (--max-seconds: the lr schedule ends
#      there), the held-out cosine every --eval-every steps (validation.jsonl, written as it goes), then the merge
#      (N:M bases re-projected with SparseGPT: violations counted) and the merged cosine.
# Everything goes to "$OUT/15m/" (at most 6 files: call4.log with compress's output, compress.json, heal-{a,b}.log,
# heal-minilm-<UTC>-{a,b}.json, or validation-{a,b}.jsonl for a heal killed before its JSON; 8 come back at most);
# every step has its own timeout, the call CALL4_BUDGET seconds.
# Run from the repo root: OUT=$OUT bash benchmarks/experiments/gpu_round_minilm_call4.sh
# CPU rehearsal (a couple of steps; how it was run: tests of this path in the README's heal section):
#   OUT=/tmp/o bash ...call3.sh; DEVICE=cpu CALL4_BUDGET=1500 COMPRESS_FLAGS='--calib-samples 32 ...' HEAL_A='--steps 4 ...' HEAL_B='--steps 3 ...' OUT=/tmp/o bash ...call4.sh
set -u -f   # -f: the regex in the heal flags is not a glob
t0=$(date +%s)
budget=${CALL4_BUDGET:-290}
left() { echo $(( budget - ($(date +%s) - t0) )); }
O="$OUT/15m"
mkdir -p "$O"
L="$O/call4.log"
dev=${DEVICE:-cuda}
work=${WORK:-/tmp/15m}
# --- 1. the teacher folder from the two halves
if [ ! -f /tmp/minilm/model.safetensors.aa ]; then
  echo "part A missing in /tmp/minilm: the machine was not kept warm since call 3" >> "$L"; exit 4
fi
timeout 30 cp -r .mlB/model/. /tmp/minilm/ \
  && timeout 30 cat /tmp/minilm/model.safetensors.aa /tmp/minilm/model.safetensors.ab > /tmp/minilm/model.safetensors.part \
  && mv /tmp/minilm/model.safetensors.part /tmp/minilm/model.safetensors && rm -f /tmp/minilm/model.safetensors.aa /tmp/minilm/model.safetensors.ab
size=$(stat -c %s /tmp/minilm/model.safetensors 2>/dev/null || echo 0)
md5=$(md5sum /tmp/minilm/model.safetensors 2>/dev/null | cut -d' ' -f1)
echo "joined model.safetensors: $size bytes (expected $(cat .mlB/model.safetensors.size)), md5 $md5 (expected $(cat .mlB/model.safetensors.md5))" >> "$L"
if [ "$size" != "$(cat .mlB/model.safetensors.size)" ] || [ "$md5" != "$(cat .mlB/model.safetensors.md5)" ]; then
  echo "the joined file does not match: stop" >> "$L"; exit 5
fi
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.used,temperature.gpu --format=csv 2>&1; date -u; git log -1 --format=%H 2>&1; } >> "$L"
rm -rf "$work" && mkdir -p "$work"
# --- 2. the budget solver's 50% student (PRECOMPRESSED=DIR: a CPU rehearsal's shortcut, a compress --out folder)
[ -n "${PRECOMPRESSED:-}" ] && cp -r "$PRECOMPRESSED" "$work/mc" && echo "student copied from $PRECOMPRESSED" >> "$L"
[ -n "${PRECOMPRESSED:-}" ] || timeout ${COMPRESS_T:-120} python3 -m structmat compress --model /tmp/minilm --target-params 0.5 --device "$dev" \
  --out "$work/mc" ${COMPRESS_FLAGS:-} >> "$L" 2>&1
rc=$?
echo "compress rc=$rc at +$(( $(date +%s) - t0 ))s" >> "$L"
if [ ! -f "$work/mc/compress.json" ]; then
  # The solver chose no Monarch layer for MiniLM on CPU (31 N:M + 5 low rank): the same solver without Monarch has
  # fewer candidates to price. Said so in the log and in compress.json's args.
  echo "FALLBACK: the default budget compress did not finish; the solver again over lowrank@whitened,nm@sparsegpt" >> "$L"
  timeout ${COMPRESS_T2:-60} python3 -m structmat compress --model /tmp/minilm --target-params 0.5 --device "$dev" \
    --allow lowrank@whitened,nm@sparsegpt --out "$work/mc" ${COMPRESS_FLAGS:-} >> "$L" 2>&1
  echo "compress (fallback) rc=$? at +$(( $(date +%s) - t0 ))s" >> "$L"
fi
cp "$work/mc/compress.json" "$O/" 2>> "$L"
[ -f "$work/mc/compress.json" ] || { echo "no compressed student: stop" >> "$L"; exit 6; }
# --- 3. two heal recipes at once on the one GPU (MiniLM leaves an H200 mostly idle), for what is left (setup,
#        evaluations, merge and files: HEAL_OVERHEAD seconds). Both: adapters placed by the knapsack + LayerNorm
#        weights = 1.99% of the 36 linear weights, batch 64 x 128, lr 2e-3 (5e-3 was worse on CPU: 0.9096 vs 0.9132
#        after 30 steps of 16 x 128); B adds the per-block hidden-state loss (--hidden-weight 1), to see whether it
#        pays at thousands of steps. The PNGs are drawn here from the JSONs (8 files come back at most).
rest=$(left)
train_s=$(( rest - ${HEAL_OVERHEAD:-80} ))
[ "$train_s" -ge 10 ] || { echo "only ${rest}s left: no heal" >> "$L"; exit 7; }
# --texts 16384: the device's Python 3.12 stdlib (504 training files) holds 18,506 distinct chunks; 32768 failed there
common="--steps 100000 --batch-size 64 --seq-len 128 --warmup 100 --texts 16384 --eval-every 250 --ckpt-every 0"
flags_a=${HEAL_A:-"$common --lr 2e-3 --budget 0.019 --extra-trainable .*LayerNorm.*"}
flags_b=${HEAL_B:-"$common --lr 2e-3 --budget 0.019 --extra-trainable .*LayerNorm.* --hidden-weight 1"}
for tag in a b; do
  [ $tag = a ] && flags=$flags_a || flags=$flags_b
  echo "heal $tag: ${rest}s left, training capped at ${train_s}s; $flags" >> "$L"
  # shellcheck disable=SC2086
  timeout $(( rest - 3 )) python3 benchmarks/heal_minilm.py --student "$work/mc/target-0.50" --teacher /tmp/minilm \
    --device "$dev" --max-seconds "$train_s" --work "$work/heal-$tag" --out "$work/out" --tag $tag --no-png $flags \
    > "$O/heal-$tag.log" 2>&1 &
  eval "pid_$tag=$!"
done
wait "$pid_a"; echo "heal a rc=$? at +$(( $(date +%s) - t0 ))s" >> "$L"
wait "$pid_b"; echo "heal b rc=$? at +$(( $(date +%s) - t0 ))s" >> "$L"
set +f   # globs again (the flags are spent)
for tag in a b; do
  if ls "$work/out/"heal-minilm-*-$tag.json > /dev/null 2>&1; then
    cp "$work/out/"heal-minilm-*-$tag.json "$O/"
  else  # killed before its JSON: the curve as it was written
    cp "$work/heal-$tag/validation.jsonl" "$O/validation-$tag.jsonl" 2>> "$L"
  fi
done
echo "done at +$(( $(date +%s) - t0 ))s" >> "$L"
ls -la "$O" >> "$L"
