#!/usr/bin/env bash
# Session 20, GPU round 2 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s20_r2.sh
# Round 1 (logs s20-round1/): eager prefill 4x2048 spends 10.8 of dense's 21.9 GPU-ms outside the linears (SDPA 1.1,
# the rest elementwise: norms, rotary's cat, SiLU, casts); compiled by inductor the ratios rose (Monarch 1.17 ->
# 1.29x, low-rank 1.26 -> 1.50x, block-diagonal 1.52 -> 1.96x), yet compiled dense still took 18.7 ms for 11.1 ms of
# GEMMs. 1. Where compiled prefill's time goes (kernel breakdown of the compiled forwards; prediction: SDPA and the
# fused elementwise kernels ~3 ms, so ~4 ms is something else). 2. Monarch's many-token rule (4096^2 nb=4 at 8192
# tokens now cuBLAS: auto should read 1.64x, was 1.54x; nb=8 and 2048^2 unchanged), and 3. bench kernels at the
# large shapes, so no row lost speed. 3. bench infer's prefill, eager and compiled, for every structure, unfused and
# fused (and the steady peak: a second forward's, without the autotuner's 256 MB L2-flush buffer).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch, transformers; print(triton.__version__, torch.__version__, transformers.__version__)" > "$OUT/versions.txt" 2>&1
step gapc 150 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" --models dense,monarch --compiled
step prefill 270 python3 -m structmat bench infer \
  --structures monarch,lowrank,blockdiag,monarch+fused,lowrank+fused,blockdiag+fused,nm24 \
  --steps prefill_tps,prefill_compiled --no-kernels --reps 5 --budget-s 220 --out "$OUT/12"
step many 120 python3 benchmarks/experiments/monarch_many.py --out "$OUT/12" --tokens 1024,8192 --shapes 0,3,4
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
