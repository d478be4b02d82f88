#!/usr/bin/env bash
# Session 26, GPU call 3 (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s26_b.sh
# After call 2 (gpu_round_s26_a.sh): one process per model put dense at 545 tokens/s in HF's compiled generate and
# the structured models at 304-428, with "TorchDynamo Cache Lookup" 124 us per token for dense against 283-440 (the
# processes' hosts also differed by up to 1.9x in the same launch calls). Here: (1) the same models with the guards
# skipped after the warm-up (skip_guard_eval_unsafe), and the compile-time "Guard eval latency" of each (TORCH_LOGS
# guards); (2) `structmat generate --compile` low-rank against dense in one process, interleaved rounds (the session
# 19 measure). Prediction: skipping guards narrows the structured models' lookup to within ~50 us of dense's.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
D=/tmp/s26-folders
step folders 150 python3 benchmarks/experiments/generate_folders.py --out "$D" --device cuda --structures lowrank,blockdiag
for s in dense lowrank blockdiag; do
  TORCH_LOGS=guards step "skip-$s" 150 python3 benchmarks/experiments/compiled_generate_profile.py \
    --dir "$D" --structures "$s" --tokens 32 --rounds 3 --skip-guards --out "$STEP_DIR"
  grep -h "Guard eval latency" "$STEP_DIR/skip-$s.log" > "$STEP_DIR/latency-$s.txt"
  python3 - "$STEP_DIR/skip-$s.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
keep = [l for l in text.splitlines() if "[__guards]" not in l]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")  # (the guard trees: megabytes; the latency lines are kept)
PY
done
step "generate-lowrank" 240 python3 -m structmat generate --model "$D/lowrank" --baseline "$D/dense" \
  --prompt "w5 w6 w7 w8" --max-new-tokens 64 --rounds 3 --compile --json "$STEP_DIR/generate-lowrank-compiled.json"
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
