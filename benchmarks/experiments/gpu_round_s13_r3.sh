#!/usr/bin/env bash
# Session 13, GPU round 3 (one H200, nothing carried), issue 12, from the repo root (old/a as in round 2):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s13_r3.sh
# Round 2 bisected the fused low-rank model's slower compiled step (0.442 -> 0.475 ms) to c40468b, whose inductor
# kernels are named as from many small graphs: the graphs, graph breaks and recompiles of that step, now and at
# f9b765d.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step breaks 150 python3 benchmarks/experiments/compile_breaks.py --out "$OUT/12/cur" --models lowrank+fused,nm24
cp benchmarks/experiments/compile_breaks.py old/a/benchmarks/experiments/
cd old/a && step breaks_a 100 python3 benchmarks/experiments/compile_breaks.py --out "$OUT/12/a" --models lowrank+fused && cd ../..
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
