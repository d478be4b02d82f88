#!/usr/bin/env bash
# Session 18, GPU round 1 (one H200), issue 12, from the repo root (written in session 18, which was lent no GPU:
# not yet run; run it after gpu_round_s17_r1.sh and _r2.sh):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s18_r1.sh
# Where fused Monarch's prefill loses its 3.5 ms (session 10: 1.03x dense fused against 1.21x unfused, the same
# kernels and GPU time; CPU profiles of both forms, with the GPU's dispatch choices emulated in session 18, found no
# host-side difference): prefill_fused.py now records each forward's host time (no sync inside), wall time, GPU busy
# and idle time and the longest idle gaps with the kernels around them. Read: host_ms close to wall_ms means the
# host issues slower than the GPU runs (or something syncs); idle gaps after one kernel name point at its caller.
# Then the low-rank pair for comparison (fused low-rank prefilled at 1.33x).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step gap 240 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" \
  --models dense,monarch,monarch+fused,lowrank,lowrank+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
