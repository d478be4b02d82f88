#!/usr/bin/env bash
# Session 4 (2026-12-03 afternoon), round 2, call 1 (carry .smolA and .whl): park part A of the SmolLM2 GGUF in /tmp
# for call 2 (the machine keeps /tmp while warm, 30 s between calls), install the fla and gguf wheels into /tmp/site,
# then issue 12's `bench infer` round (benchmarks/experiments/gpu_round_infer.sh), packed into $OUT/12.tgz because
# only 8 files come back from a call.   OUT=$OUT bash benchmarks/experiments/gpu_round_s4_r2_call1.sh
set -u
OUT=${OUT:?set OUT}
t0=$(date +%s)
mkdir -p /tmp/smol && cp .smolA/model.gguf.aa /tmp/smol/ && echo "part A parked: $(stat -c %s /tmp/smol/model.gguf.aa) bytes" > "$OUT/call1.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  .smolA/gguf-*.whl >> "$OUT/call1.log" 2>&1
echo "wheels rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/call1.log"
SKIP_EXTRA=${SKIP_EXTRA:-1} timeout ${INFER_T:-300} bash benchmarks/experiments/gpu_round_infer.sh >> "$OUT/call1.log" 2>&1
echo "infer round rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/call1.log"
tar -czf "$OUT/12.tgz" -C "$OUT" 12 && rm -rf "$OUT/12"
