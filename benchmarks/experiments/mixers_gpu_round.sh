#!/usr/bin/env bash
# One GPU round for the mixers (issue 16), sized for ~5 minutes of one H200: mixer-speed on a quiet GPU, then the
# `-m gpu` mixer tests in the background while the state-tracking runs (reduced budget, preset h200-3min) train.
# Run from the repo root of a checkout with the fla 0.6.0 wheels in .whl/:  OUT=/some/dir bash <this script> [SRC]
# (SRC: the source tree to test, default ., i.e. ./src and ./tests). Every step has its own timeout. $OUT gets 8
# files at most (the device's limit): run.log, gpu-tests.log, gpu-tests-errors.jsonl, mixer-speed JSON + PNG, two
# state-tracking JSONs, triton-cache.tgz.
set -u
SRC=${1:-.}
OUT=${OUT:?set OUT to a folder for the results}
ST_SECONDS=${ST_SECONDS:-110}
WARM_SECONDS=${WARM_SECONDS:-60}  # the in-bench kernel warm-up; minutes with a cold Triton cache
export PYTHONUNBUFFERED=1
# fla compiles and autotunes ~150 Triton configs per kernel set and shape key (H, K, V, ...) on first use: on a fresh
# H200 that took > 100 s per set (run of 2026-12-03T09:22Z). Keep the cache: the round writes it to
# $OUT/triton-cache.tgz; put that file into SRC and carry it, and the next round starts warm.
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
[ -f "${SRC}/triton-cache.tgz" ] && tar -xzf "${SRC}/triton-cache.tgz" -C /tmp && echo "triton cache: carried" >&2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 3
export PYTHONPATH=$PWD/$SRC/src:$PWD/$SRC/tests:/tmp/site
cd "$SRC"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv; date -u;
  du -sh "$TRITON_CACHE_DIR"; } > "$OUT/run.log" 2>&1
t0=$(date +%s)
# 1. speed: fla through structmat vs fla called directly vs SDPA, alone on the GPU
timeout 100 python3 -m structmat.bench.mixer_speed --Ts 2048,8192,16384 --columns chunked,sdpa,fla,fla_direct \
  --reps 20 --rounds 3 --out "$OUT" >> "$OUT/run.log" 2>&1
echo "mixer-speed done rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/run.log"
# 2. GPU tests (correctness only, so they may share the GPU), 4 processes to overlap Triton compiles
STRUCTMAT_GPU_TEST_LOG="$OUT/gpu-tests-errors.jsonl" timeout 200 python3 -m pytest tests/test_mixers_fla_gpu.py \
  -m gpu -o addopts="" -n 4 -v -rA -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1 &
tests=$!
ST="python3 -m structmat.bench.state_tracking --preset h200-3min --backend fla --device cuda"
# 3. state tracking, reduced budget: 2 seeds, ST_SECONDS of training per run, 20 runs at once (each invocation
#    first compiles fla's kernels in one process: warm_kernel_caches)
timeout $(( ST_SECONDS + WARM_SECONDS + 60 )) $ST --max-seconds "$ST_SECONDS" --tasks parity,modarith \
  --models "deltanet[0,1],deltanet[-1,1]" --workers 8 --out "$OUT" >> "$OUT/run.log" 2>&1 &
st1=$!
sleep 2  # the JSON names carry the start second
timeout $(( ST_SECONDS + WARM_SECONDS + 60 )) $ST --max-seconds "$ST_SECONDS" --tasks s3,s5 \
  --models "deltanet[-1,1],deltaproduct2[-1,1],deltaproduct4[-1,1]" --workers 12 --out "$OUT" \
  >> "$OUT/run.log" 2>&1
wait $st1
echo "state-tracking done at +$(( $(date +%s) - t0 ))s" >> "$OUT/run.log"
wait $tests
echo "gpu tests rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/run.log"
tar -czf "$OUT/triton-cache.tgz" -C /tmp triton-cache  # > 16 MiB does not come back: then prune or split it
ls -la "$OUT" >> "$OUT/run.log"
