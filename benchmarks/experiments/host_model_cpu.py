"""Host time per eager decode token of a whole HF Llama, on a CPU (issue 12, session 23): where an unfused
structured model's eager decode loses to dense on a host-bound machine.

A small Llama (hidden 256, SwiGLU 1024, 8 layers: the compute is negligible) decodes one token at a time with its KV
cache, under ``torch.inference_mode``; per model the fastest of ``--reps`` loops of ``--steps`` tokens, in
microseconds per token, over ``--rounds`` interleaved rounds. Models: ``floor`` (every block linear replaced by a
module that returns ``new_empty``: the least a Python layer call costs), the structured models of ``bench infer``
with the decode kernels' launches stubbed (``decode_host.stub_launches``: the GPU decode path's Python, launches
excluded) and, for reference only, ``dense`` (its CPU matmuls are real work, so it is no host-time baseline here).
(structured - floor) / 56 is a structured layer call's Python beyond the floor's.

    PYTHONPATH=src python benchmarks/experiments/host_model_cpu.py [--models ...] [--out DIR]

Writes ``host-model-cpu-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
from torch import nn

SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512)


class EmptyLinear(nn.Module):
    """The floor of a layer call: the module call and one output allocation."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], self.out_features))


def per_token_us(model, steps: int, reps: int) -> float:
    ids = torch.ones(1, 8, dtype=torch.long)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            cache = model(input_ids=ids, use_cache=True).past_key_values
            one = ids[:, :1]
            t = time.perf_counter()
            for _ in range(steps):
                model(input_ids=one, past_key_values=cache, use_cache=True)
            best = min(best, (time.perf_counter() - t) / steps)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="floor,lowrank,monarch,blockdiag,nm24,lowrank+fused,nm24+fused,dense")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    from structmat.bench import infer
    from structmat.bench.decode_host import stub_launches
    from structmat.eval.results import run_info, write_json

    stub_launches()
    torch.set_num_threads(1)
    names = args.models.split(",")
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name in names:
            model = infer.build(None if name in ("dense", "floor") else name, torch.float32, SHAPE, device="cpu")
            if name == "floor":
                for module in list(model.modules()):
                    for child_name, child in list(module.named_children()):
                        if child_name in infer.BLOCK_LINEARS:
                            setattr(module, child_name, EmptyLinear(child.out_features))
            times.setdefault(name, []).append(per_token_us(model, args.steps, args.reps))
    calls = SHAPE["num_hidden_layers"] * len(infer.BLOCK_LINEARS)
    floor = min(times["floor"]) if "floor" in times else None
    rows = {n: {"us_per_token": min(v), "rounds": v,
                **({"per_call_over_floor_us": (min(v) - floor) / calls} if floor and n not in ("floor", "dense")
                   else {})} for n, v in times.items()}
    for n, r in rows.items():
        print(f"{n:16s} {r['us_per_token']:8.1f} us/token", r.get("per_call_over_floor_us", ""))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"shape": SHAPE, "layer_calls_per_token": calls, "rows": rows, "run_info": run_info(vars(args))}
    print("wrote", write_json(Path(args.out) / f"host-model-cpu-{stamp}.json", result))


if __name__ == "__main__":
    main()
