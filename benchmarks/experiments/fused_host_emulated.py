"""Does a fused-sibling model's forward cost the host more than the unfused one's at many tokens (issue 12, session
18)? On a CPU, with the GPU's dispatch choices emulated: ``decode_host.stub_launches`` (the decode kernels' launches
no-ops, the dispatch deciding as for a GPU tensor) and the grouped Triton GEMM a no-op too, a small Llama of the
bench's layout (hidden 64, SwiGLU 256, 8 layers) in bf16, built by ``structmat.bench.infer.build`` unfused and with
``+fused``, runs forwards of ``--tokens`` tokens (above the 64 the decode kernels take): the best of 5 loops of 10
forwards per round, rounds interleaved, and a cProfile of 10 forwards each (Python calls per forward).

    PYTHONPATH=src python benchmarks/experiments/fused_host_emulated.py [--tokens 128] [--structure monarch] [--out DIR]

Writes ``fused-host-emulated-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import pstats
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--structure", default="monarch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import structmat.kernels as K
    from structmat.bench.decode_host import stub_launches
    from structmat.bench.infer import build
    from structmat.eval.results import run_info, write_json
    from structmat.kernels import ops

    stub_launches()
    ops.grouped_gemm = lambda *a, **k: None  # (the many-token Triton GEMM: no launch either)
    torch.set_num_threads(1)
    shape = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256)
    ids = torch.randint(0, 256, (1, args.tokens))
    names = [args.structure, args.structure + "+fused"]
    models = {n: build(n, torch.bfloat16, shape, device="cpu") for n in names}
    forward = {n: (lambda m=m: m(input_ids=ids, use_cache=False, logits_to_keep=1)) for n, m in models.items()}
    ms: dict = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(args.rounds):
            for n in names:
                for _ in range(3):
                    forward[n]()
                best = float("inf")
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(10):
                        forward[n]()
                    best = min(best, (time.perf_counter() - t0) / 10 * 1e3)
                ms[n].append(best)
        calls = {}
        for n in names:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                forward[n]()
            prof.disable()
            calls[n] = sum(v[1] for v in pstats.Stats(prof).stats.values()) / 10
    result = {"forward_ms_per_round": ms, "python_calls_per_forward": calls, "choices": dict(K.LAST_CHOICE),
              "tokens": args.tokens, "shape": shape, "run_info": run_info(vars(args))}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"fused-host-emulated-{stamp}.json", result)
    for n in names:
        print(f"{n:>16}: {' / '.join(f'{t:.2f}' for t in ms[n])} ms per forward, {calls[n]:.0f} Python calls")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
