"""Why the reloaded `structmat compress` checkpoint decoded eagerly at 0.58x dense, unfused (session 24, H200,
``gpu_round_s22_r5.sh``), where the bench's own low-rank model of the same shape decodes at 0.93-0.95x and the same
checkpoint fused at 1.07x (issue 12). Candidates: the loaded factors' addresses (safetensors) or ranks (816, a
multiple of 16, where the bench has 819) taking another launch path; or the host's noise in the one measurement.

    PYTHONPATH=src python benchmarks/experiments/ckpt_eager_diag.py --checkpoint DIR [--out DIR]

Per model (dense, the checkpoint, the bench's low-rank, the checkpoint fused), over interleaved rounds: HF generate
b1 tokens/s (as ``bench infer``), one MLP layer's eager call at one token (host-bound: microseconds per call), the
factors' address alignment and ranks, the dispatch's choice at one token and the CUDA kernels one decoded token
launches; the rounds again after the compiles ``bench infer`` ran before the row (the fused checkpoint's
compiled prefill and decode step). Writes ``ckpt-eager-diag-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from collections import Counter
from pathlib import Path

import _common
import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    from structmat.bench import infer
    from structmat.io import load_pretrained
    from structmat.kernels import dispatch
    from structmat.siblings import fuse_siblings

    def checkpoint(fused: bool):
        model = load_pretrained(args.checkpoint, device="cuda", dtype=torch.bfloat16)
        model.config.use_cache = True
        if fused:
            fuse_siblings(model)
        return model.eval()

    models = {"dense": infer.build(None, torch.bfloat16, infer.SHAPE),
              "checkpoint": checkpoint(False),
              "lowrank": infer.build("lowrank", torch.bfloat16, infer.SHAPE),
              "checkpoint+fused": checkpoint(True)}
    out: dict = {"rounds": [], "models": {}}
    for name, model in models.items():
        gate = model.model.layers[0].mlp.down_proj
        facts = {n: dict(shape=list(t.shape), addr_mod16=t.data_ptr() % 16, stride=list(t.stride()),
                         storage_bytes=t.untyped_storage().nbytes(), offset=t.storage_offset())
                 for n, t in list(gate.named_parameters()) + list(gate.named_buffers())}
        x = torch.randn(1, 1, gate.in_features, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            dispatch.LAST_CHOICE.clear()
            gate(x)
            choice = dict(dispatch.LAST_CHOICE)
            us = _common.wall_us(lambda: gate(x), n=2000, warmup=50)
        # the kernels of one decoded token (prompt and first token excluded by difference of 2 and 3 new tokens)
        kernels = {}
        for n_new in (2, 3):
            ids = torch.randint(0, 32000, (1, infer.PROMPT), device="cuda")
            with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                               min_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None)
            kernels[n_new] = Counter(e.name[:90] for e in prof.events() if e.device_type.name == "CUDA")
        per_token = {k: v - kernels[2].get(k, 0) for k, v in kernels[3].items() if v - kernels[2].get(k, 0)}
        out["models"][name] = dict(down_proj=type(gate).__name__, factors=facts, choice=choice,
                                   layer_call_us=round(us, 2), kernels_per_token=per_token,
                                   launches_per_token=sum(per_token.values()))
        print(name, json.dumps(out["models"][name])[:1500], flush=True)
    def rounds(label: str) -> None:
        for r in range(args.rounds):
            row = {"when": label}
            for name, model in models.items():
                row[name] = infer.generate_tps(model, 1, 32, False, "", "", 3)["tokens_per_s"]
            out["rounds"].append(row)
            print("round", label, r, {k: v if isinstance(v, str) else round(v, 1) for k, v in row.items()}, flush=True)

    rounds("fresh process")
    # bench infer measured the checkpoint's eager row after the fused checkpoint's compiled steps (inductor's
    # decode step, the prefill by block under reduce-overhead): the same compiles here, then the rounds again
    fused = models["checkpoint+fused"]
    infer.prefill_compiled_tps(fused, 4, 2048, 3, "reduce-overhead", "blocks")
    infer.graph_decode_tps(fused, 1, compile_mode="default")
    infer._fresh_baseline()
    rounds("after the fused model's compiles")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out["device"] = torch.cuda.get_device_name()
    path = Path(args.out) / f"ckpt-eager-diag-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
