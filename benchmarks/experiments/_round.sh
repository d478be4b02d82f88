# Shared by the GPU round scripts (source it from the repo root after setting OUT and the step log folder):
#   STEP_DIR=$OUT/12; source benchmarks/experiments/_round.sh; step NAME SECONDS CMD...
# runs CMD under a limit, its output in $STEP_DIR/NAME.log, and appends "NAME rc=.. s=.." to $OUT/steps.log;
# $OUT/round.tgz holds everything so far after each step.
set -u
: "${OUT:?set OUT}" "${STEP_DIR:?set STEP_DIR}"
mkdir -p "$STEP_DIR"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
step() {
  local name=$1 secs=$2 t=$(date +%s)
  shift 2
  timeout --kill-after=5 "$secs" "$@" > "$STEP_DIR/$name.log" 2>&1
  echo "$name rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"
  # packed after every step, so a call cut off at its limit still brings back the steps that finished
  tar czf "$OUT/round.tgz" -C "$OUT" "${STEP_DIR#$OUT/}" steps.log gpu.txt 2>/dev/null
}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
