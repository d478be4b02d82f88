#!/usr/bin/env bash
# Issue 12, session 5, GPU round 1 (~205 s of one H200, nothing carried), from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s5_r1_12.sh
# 1. decode floor (decode_floor.py, <= 60 s): the bench-infer model with its block linears replaced by stand-ins
#    that read no weight (no kernel / one / two tiny kernels per linear), measured as bench infer measures dense:
#    dense / floor bounds any structure's decode speedup; fairness checks of compiled generate ride along;
# 2. per-layer decode cost (decode_layers.py, <= 45 s + 25 s for 2:4 in its own process): every candidate of every
#    structured layer shape at 1 and 16 tokens, HBM-cold (as in a model), L2-hot, and eager host time per call,
#    and three launch variants of the gemv decode kernel at 1 token;
# 3. Monarch's bench infer row (<= 75 s; cut at 46 s at 13:17Z), the same flags as gpu_round_infer.sh.
# Writes only under "$OUT/12/" (steps.log, logs/, the JSON files), packed into $OUT/12.tgz at the end.
set -u
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder that comes back}"
R="$OUT/12"
mkdir -p "$R/logs" "$R/parts"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2 t=$(date +%s)
  shift 2
  timeout --kill-after=5 "$secs" "$@" > "$R/logs/$name.log" 2>&1
  echo "$name rc=$? seconds=$(( $(date +%s) - t ))" | tee -a "$R/steps.log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; date -u; } > "$R/logs/device.log" 2>&1
step floor "${T_FLOOR:-60}" $PY benchmarks/experiments/decode_floor.py --out "$R"
step layers "${T_LAYERS:-45}" $PY benchmarks/experiments/decode_layers.py --structures lowrank,monarch,blockdiag --out "$R"
# (2:4 in its own process: its decode kernel at <= 4 tokens is new, a fault there must not cost the other rows)
step layers-nm "${T_LAYERS_NM:-25}" $PY benchmarks/experiments/decode_layers.py --structures nm24 --out "$R"
step infer-monarch "${T_MONARCH:-75}" $PY -m structmat.bench.infer --no-dense --structures monarch --batches 1,8,32 \
  --eager-batches 1 --compiled-batches 1 --new-tokens 32 --reps 2 --compile-backend cudagraphs --step-compile-mode none \
  --memory-history --out "$R/parts"
tar -czf "$OUT/12.tgz" -C "$OUT" 12 && rm -rf "$R"
exit 0
