"""Does merging a healed low-rank student keep its healing (issue 12/14 follow-up, session 19)? A structmat student
(e.g. SmolLM2 compressed by `structmat compress ... --structure lowrank@whitened`) and the adapter `structmat heal`
saved for it: perplexity on the first --tokens held-out tokens of the stdlib corpus (window 256) for the student, the
student with its adapters, and after `structmat.merge` (low-rank base + low-rank delta: exact since session 19).

    PYTHONPATH=src python benchmarks/experiments/merge_exact_check.py --student DIR --adapter DIR [--out DIR]

Writes ``merge-exact-check-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    import structmat
    from structmat.data.corpus import corpus_from_spec, split_files, token_stream
    from structmat.eval.perplexity import perplexity
    from structmat.eval.results import run_info, write_json

    tokenizer = AutoTokenizer.from_pretrained(args.student, local_files_only=True)
    _, held_out = split_files(corpus_from_spec("stdlib"))
    tokens = token_stream(held_out[:2], tokenizer)[: args.tokens]
    model = structmat.load_pretrained(args.student).eval()
    ppl = {"student": perplexity(model, tokens, window=256)["ppl"]}
    structmat.load_adapter(model, args.adapter)
    ppl["with_adapters"] = perplexity(model, tokens, window=256)["ppl"]
    report = structmat.merge(model)
    ppl["merged"] = perplexity(model, tokens, window=256)["ppl"]
    methods = sorted({row.method for row in report.rows})
    print(ppl, "merge methods:", methods, flush=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"merge-exact-check-{stamp}.json",
                      {"info": run_info(vars(args)), "ppl": ppl, "merge": report.to_dict()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
