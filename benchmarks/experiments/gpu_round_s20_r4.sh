#!/usr/bin/env bash
# Session 20, GPU round 4 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s20_r4.sh
# 1. Round 2 found the whole-model compiled prefill paying a masked SDPA (cuDNN, 3.66 ms against 1.13 eager: on
#    torch < 2.14 transformers builds the causal mask as a tensor while tracing). bench infer's compiled prefill now
#    compiles each decoder block (the mask stays eager: none, SDPA's causal kernel). Prediction: dense ~16.3 ms
#    (was 18.8), Monarch ~1.33x, low-rank ~1.5x, block-diagonal ~2x; the kernel breakdown shows the unmasked SDPA.
# 2. Low-rank's PDL pair now also for a rank <= 512 up to 8.4 MB of second stage (round 3): the bench model's fused
#    q/k/v group (rank 512, 6.3 MB) changes at 2-16 tokens: decode_groups at 4, 8 and 16 tokens, new rule (base)
#    against the old one (pair4mb). 3. bench kernels forward rows at 1-16 tokens under graphs (the must-show list).
# 4. N:M at many tokens in inference now expands each weight tile with one Triton kernel (_triton_nm_expand) where
#    the reference ran ~10 PyTorch kernels per tile (2:4 prefill 0.35x dense in round 2): its -m gpu test first;
#    prediction: 2:4 eager prefill near dense (0.85-0.95x: the GEMMs are dense-sized, plus expansion and a cat).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gputest 60 python3 -m pytest -q -p no:warnings -m gpu tests/test_kernels.py -k nm_many_tokens
step prefill 200 python3 -m structmat bench infer --structures monarch,lowrank,blockdiag,nm24 \
  --steps prefill_tps,prefill_compiled --no-kernels --reps 5 --budget-s 170 --out "$OUT/12"
step gapc 90 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" --models dense,monarch --compiled
for t in 4 8 16; do
  step groups$t 40 python3 benchmarks/experiments/decode_groups.py --out "$OUT/12" --structures lowrank \
    --variants base,pair4mb --tokens $t
done
step kernels 150 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 100
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
