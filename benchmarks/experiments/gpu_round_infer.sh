#!/usr/bin/env bash
# Issue 12, GPU round 2: `structmat bench infer` on the must-show shape (bf16, Llama hidden 2048 / SwiGLU 8192 /
# 8 layers / vocab 32000, every linear of the blocks at 50%: lowrank, monarch nb=4, blockdiag nb=4, 2:4), then the
# per-layer host cost at one token and the `bench kernels` 1-16-token forward rows under CUDA graphs.
#
#   OUT=/some/dir bash benchmarks/experiments/gpu_round_infer.sh            # the round (~360 s), from the repo root
#   OUT=/some/dir bash benchmarks/experiments/gpu_round_infer.sh --dry-run  # print the steps, run nothing
#   CKPT=1 adds the `structmat compress` checkpoint row (benchmarks/infer_checkpoint.py, then --checkpoint; +~170 s)
#
# Each model runs in its own process under its own `timeout`: a kernel fault (an illegal address poisons the whole
# CUDA context) or a time limit loses that structure only, and each process rewrites its JSON after every step, so
# a cut process keeps the rows it finished. `--merge` then combines the parts and takes the ratios against dense.
# Writes only under "$OUT/12/": parts/, logs/, infer-*.json (merged), decode-host-*.json, kernels-*.json.
set -u
# SKIP_EXTRA=1: only the bench infer models and the merge (the decode-host and kernels steps are skipped).
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
: "${OUT:?set OUT to the folder that comes back}"
R="$OUT/12"
mkdir -p "$R/parts" "$R/logs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# One model per process: 46 s each (Monarch 75 s) = 259 s. Eager generate at batch 1 only (the must-show; batch 8/32 decode
# comes from the CUDA-graph step); compiled generate through dynamo's cudagraphs backend (inductor's compile of the
# 8-layer model does not fit 46 s); the allocator's history attributes any memory beside the parameters.
INFER=(--batches 1,8,32 --eager-batches 1 --compiled-batches 1 --new-tokens 32 --reps 2 --compile-backend cudagraphs
       --step-compile-mode none --out "$R/parts")
# (KERNELS=0: no per-layer rows, decode_layers.py has them; HISTORY=1: the allocator's history per model)
[ "${KERNELS:-1}" = 0 ] && INFER+=(--no-kernels)
[ "${HISTORY:-1}" = 1 ] && INFER+=(--memory-history)
T_MODEL=${T_MODEL:-46}

step() {  # step NAME SECONDS CMD...: run under its own timeout, log to logs/NAME.log, record rc and seconds
  local name=$1 secs=$2
  shift 2
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; return 0; fi
  local t=$(date +%s)
  timeout --kill-after=5 "$secs" "$@" > "$R/logs/$name.log" 2>&1
  echo "$name rc=$? seconds=$(( $(date +%s) - t ))" | tee -a "$R/steps.log"
}

[ "$DRY" = 1 ] || { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; git rev-parse HEAD 2>/dev/null; } > "$R/logs/device.log" 2>&1
# MODELS: which of dense, floor (the block linears at no cost: the bound on any speedup), lowrank, monarch, blockdiag,
# nm24 run, in that order (each in its own process)
MODELS=${MODELS:-dense floor lowrank monarch blockdiag nm24}
case " $MODELS " in *" dense "*) step infer-dense "$T_MODEL" $PY -m structmat.bench.infer --structures "" "${INFER[@]}";; esac
for s in ${MODELS//dense/}; do
  # (Monarch's process hit 46 s at 13:17Z after its memory and prefill rows: first-use Triton compiles; more time)
  secs=$T_MODEL; [ "$s" = monarch ] && secs=${T_MONARCH:-75}
  step "infer-$s" "$secs" $PY -m structmat.bench.infer --no-dense --structures "$s" "${INFER[@]}"
done
[ "${SKIP_EXTRA:-0}" = 1 ] || step decode-host 25 $PY -m structmat.bench.decode_host --calls 2000 --repeats 5 --out "$R"
[ "${SKIP_EXTRA:-0}" = 1 ] || step kernels 60 $PY -m structmat.bench.kernels --quick --modes fwd --graphs --no-semi --tokens 1,4,16 \
  --shapes 2048x2048,2048x8192,8192x2048 --rep 10 --budget-s 40 --out "$R"
if [ "${CKPT:-0}" = 1 ]; then  # opt-in (+~170 s): the `structmat compress` checkpoint row, reloaded by load_pretrained
  step ckpt-build 120 $PY benchmarks/infer_checkpoint.py --work "$R/ckpt"
  CK=$(ls -d "$R"/ckpt/compressed/target-* 2>/dev/null | head -1)
  step infer-checkpoint "$T_MODEL" $PY -m structmat.bench.infer --no-dense --structures "" --checkpoint "${CK:-$R/ckpt/compressed/target-0.5}" "${INFER[@]}"
  [ "$DRY" = 1 ] || rm -rf "$R/ckpt"  # (the model folders stay on the device: only the JSON comes back)
fi
if [ "$DRY" = 1 ]; then  # (the parts do not exist in a dry run: the glob is printed as it stands)
  echo "$PY -m structmat.bench.infer --merge $R/parts/infer-*.json --out $R"
else
  step infer-merge 20 $PY -m structmat.bench.infer --merge "$R"/parts/infer-*.json --out "$R"
fi
exit 0
