# Shared by the GPU round scripts (source it from the repo root after setting OUT and the step log folder):
#   STEP_DIR=$OUT/12; source benchmarks/experiments/_round.sh; step NAME SECONDS CMD...
# runs CMD under a limit, its output in $STEP_DIR/NAME.log, and appends "NAME rc=.. s=.." to $OUT/steps.log.
set -u
: "${OUT:?set OUT}" "${STEP_DIR:?set STEP_DIR}"
mkdir -p "$STEP_DIR"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
step() {
  local name=$1 secs=$2 t=$(date +%s)
  shift 2
  timeout --kill-after=5 "$secs" "$@" > "$STEP_DIR/$name.log" 2>&1
  echo "$name rc=$? s=$(( $(date +%s) - t ))" >> "$OUT/steps.log"
}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
