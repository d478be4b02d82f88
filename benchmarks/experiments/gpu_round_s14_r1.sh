#!/usr/bin/env bash
# Session 14, GPU round 1 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s14_r1.sh
# (a first run of this script, with a timing step and a wrong import flag, returned nothing of use)
# What bounds the few-token kernels that stay slower than dense (2:4 at 16 tokens, low-rank with a large second
# stage above one token) and the fused low-rank model's one-token pair: Nsight Compute's full set on each case of
# benchmarks/experiments/ncu_decode.py (caches flushed before each pass; clocks left alone), plus their times.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" >> "$OUT/steps.log"

step ncu 300 "$NCU" --profile-from-start off --clock-control none --nvtx --set full -f -o "$STEP_DIR/decode" \
  python3 benchmarks/experiments/ncu_decode.py
step details 120 "$NCU" --import "$STEP_DIR/decode.ncu-rep" --page details --print-details all
step raw 60 "$NCU" --import "$STEP_DIR/decode.ncu-rep" --page raw --csv --metrics \
gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,\
launch__grid_size,launch__block_size,launch__registers_per_thread,smsp__inst_executed.sum,\
l1tex__t_bytes.sum,lts__t_bytes.sum,smsp__cycles_active.avg
ls -la "$STEP_DIR" >> "$OUT/steps.log"
rm -f "$STEP_DIR/decode.ncu-rep"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
