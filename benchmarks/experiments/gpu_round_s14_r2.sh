#!/usr/bin/env bash
# Session 14, GPU round 2 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s14_r2.sh
# The PDL pair's second stage as a persistent grid (one program per SM, each taking every SM-count-th tile, the next
# tile's weight loaded before this one's product; _triton_decode.STAGE2_PER_SM) against a program per tile
# (STRUCTMAT_STAGE2_PER_SM=0, the form before): the batch-1 steps of the models whose one-token
# products are pairs (captured and inductor-compiled; off / on / off / on in four processes), and Nsight Compute on
# the one-token low-rank cases of round 1 (at rank 819, as ncu_decode.py then had it).
# The persistent form is not in the tree (measured slower): apply
# benchmarks/experiments/patches/s14_persistent_stage2.diff to rerun this round.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
M=dense,lowrank+fused,monarch+fused,lowrank,monarch
for i in 1 2; do
  for per_sm in 0 1; do
    mkdir -p "$OUT/12/floor-$per_sm-$i"
    export STRUCTMAT_STAGE2_PER_SM=$per_sm
    step "floor-$per_sm-$i" 130 python3 benchmarks/experiments/decode_floor.py \
      --out "$OUT/12/floor-$per_sm-$i" --models $M --graph-batches 1 --eager-models "" --generate-models "" --step-compile $M
  done
done
unset STRUCTMAT_STAGE2_PER_SM
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
step ncu 120 "$NCU" --profile-from-start off --clock-control none --nvtx --set full -f -o "$STEP_DIR/decode" \
  python3 benchmarks/experiments/ncu_decode.py --cases lrgateup,lr819_2048x8192_t1,lr819_8192x2048_t1,lr512_2048x8192_t1
step raw 60 "$NCU" --import "$STEP_DIR/decode.ncu-rep" --page raw --csv --metrics \
gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
launch__grid_size,launch__block_size,launch__registers_per_thread,smsp__inst_executed.sum
rm -f "$STEP_DIR/decode.ncu-rep"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
