#!/usr/bin/env bash
# Issue 12, session 5, GPU round 2 (<= 90 s of one H200, nothing carried), from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s5_r2_12.sh
# One process, so that every ratio is within one host state (round 1 showed HF generate host-bound and host speed
# varying between processes): decode_floor.py measures, in this order,
#   dense, block-diagonal: the captured step b1 (eager model), eager HF generate b1, the inductor-compiled step b1
#     (compiled, then captured: a serving loop's decode) -- block-diagonal with the measured dispatch of 56be63c;
#   floor1 (one tiny kernel per block linear): captured step + eager generate (the eager bound; round 1's floor with
#     zero views ran eager slower than dense, its stride-0 outputs take slower paths downstream);
#   low-rank, Monarch, 2:4: captured step b1 + eager generate b1 with the new dispatch (and 2:4's gather kernel);
#   floor (no kernel): the inductor-compiled step, the bound for the compiled step (last: a time limit cuts it first).
# Writes only under "$OUT/12/", packed into $OUT/12.tgz.
set -u
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder that comes back}"
R="$OUT/12"
mkdir -p "$R/logs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } > "$R/logs/device.log" 2>&1
t=$(date +%s)
timeout --kill-after=3 "${T_SAME:-82}" $PY benchmarks/experiments/decode_floor.py --out "$R" \
  --models dense,blockdiag,floor1,lowrank,monarch,nm24,floor --graph-batches 1 \
  --eager-models dense,blockdiag,floor1,lowrank,monarch,nm24 --generate-models "" \
  --step-compile dense,blockdiag,floor > "$R/logs/same-process.log" 2>&1
echo "same-process rc=$? seconds=$(( $(date +%s) - t ))" | tee -a "$R/steps.log"
tar -czf "$OUT/12.tgz" -C "$OUT" 12 && rm -rf "$R"
exit 0
