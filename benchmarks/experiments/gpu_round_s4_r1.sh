#!/usr/bin/env bash
# GPU round 1 of the session of 2026-12-03 afternoon (one call, ~9 minutes of one H200; carry .whl with the fla 0.6.0
# wheels):  OUT=$OUT bash benchmarks/experiments/gpu_round_s4_r1.sh
# 1. issue 16: mixer re-time (fla through structmat vs fla direct vs SDPA vs chunked, T = 2048/8192/16384), with a
#    limit that covers fla's first-use Triton autotuning on a fresh machine (> 3 minutes, measured twice before);
# 2. issue 16: the fla GPU tests (cases not reached before: n_h = 4, gated n_h = 2, padding / cu_seqlens);
# 3. issue 12: the decode probe's kernel section (1-64 tokens, CUDA graphs), the first GPU run of the N:M decode kernel
#    rewritten to read values and uint8 positions once.
# Each step has its own timeout; results go to $OUT/16 and $OUT/12 (8 files at most come back: no Triton cache).
set -u
OUT=${OUT:?set OUT}
mkdir -p "$OUT/16" "$OUT/12"
t0=$(date +%s)
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/run.log" 2>&1 || exit 3
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv; date -u; } >> "$OUT/run.log" 2>&1
timeout ${MIX_T:-360} python3 -m structmat.bench.mixer_speed --Ts 2048,8192,16384 --columns chunked,sdpa,fla,fla_direct \
  --reps 20 --rounds 3 --out "$OUT/16" > "$OUT/16/mixer-speed.log" 2>&1
echo "mixer-speed rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/run.log"
STRUCTMAT_GPU_TEST_LOG="$OUT/16/gpu-tests-errors.jsonl" timeout ${TEST_T:-110} python3 -m pytest \
  tests/test_mixers_fla_gpu.py -m gpu -o addopts="" -n 4 -v -rA -p no:cacheprovider > "$OUT/16/gpu-tests.log" 2>&1
echo "gpu tests rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/run.log"
timeout ${PROBE_T:-75} python3 benchmarks/experiments/decode_probe.py --sections kernels --out "$OUT/12" \
  > "$OUT/12/decode-probe.log" 2>&1
echo "decode probe rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/run.log"
ls -la "$OUT" "$OUT/16" "$OUT/12" >> "$OUT/run.log"
