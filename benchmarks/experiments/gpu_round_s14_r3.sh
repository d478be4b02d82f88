#!/usr/bin/env bash
# Session 14, GPU round 3 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s14_r3.sh
# Nsight Compute on every linear-layer kernel of one token through a one-block bench-infer Llama (dense and the
# structured models whose one-token products are PDL pairs, fused and not; the bench's ranks, multiples of 8), and the
# micro cases of ncu_decode.py at rank 816.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
K='regex:_pdl|_decode|_fused|nvjet|gemv|Kernel2|splitK|gemm'
S="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats"
step ncu_models 200 "$NCU" --profile-from-start off --clock-control none --nvtx $S -k "$K" -f -o "$STEP_DIR/models" \
  python3 benchmarks/experiments/ncu_decode.py --models dense,lowrank+fused,monarch+fused,lowrank,monarch
step ncu_cases 120 "$NCU" --profile-from-start off --clock-control none --nvtx $S -f -o "$STEP_DIR/cases" \
  python3 benchmarks/experiments/ncu_decode.py --cases lr816,lrgateup,lr512_2048x8192_t1,dense_2048x8192_t1
for r in models cases; do
  step "raw_$r" 60 "$NCU" --import "$STEP_DIR/$r.ncu-rep" --page raw --csv --metrics \
gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
launch__grid_size,launch__block_size,launch__registers_per_thread,smsp__inst_executed.sum,\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers,\
smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio
  step "details_$r" 60 "$NCU" --import "$STEP_DIR/$r.ncu-rep" --page details
done
rm -f "$STEP_DIR"/*.ncu-rep
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
