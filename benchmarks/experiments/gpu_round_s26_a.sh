#!/usr/bin/env bash
# Session 26, GPU call 2 (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s26_a.sh
# Where the host time of `structmat generate --compile` goes per token (HF generate, static cache, inductor
# reduce-overhead), each model in its own process (folders at the bench shape from generate_folders.py).
# Prediction: the structured models' tokens cost more host time than dense's (session 19: low-rank 0.88x dense in
# HF's compiled generate where its captured step runs 1.5x), in dynamo's guard evaluation ("TorchDynamo Cache
# Lookup", ~1.6x dense's guards on a tiny Llama on CPU) and the CUDA-graph tree's per-replay checks; graph replays
# one per token for every model (perf_hints would log any skipped CUDA graph).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
D=/tmp/s26-folders
step folders 150 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda \
  --structures lowrank,monarch,blockdiag,nm24
for s in dense lowrank blockdiag monarch nm24; do
  TORCH_LOGS=perf_hints step "profile-$s" 150 python3 benchmarks/experiments/compiled_generate_profile.py \
    --dir "$D" --structures "$s" --tokens 32 --rounds 3 --out "$STEP_DIR"
done
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
