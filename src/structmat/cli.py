"""The structmat command line: thin; parses flags, calls the library, prints tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _demo(args: argparse.Namespace) -> int:
    from .data.pretrained import load_minilm, minilm_dir
    from .eval.projection_table import DEFAULT_SPECS, format_table, project_all, rows_as_dicts
    from .eval.results import run_info, write_json

    torch.manual_seed(args.seed)
    specs = DEFAULT_SPECS
    if args.structures:
        wanted = [s.strip() for s in args.structures.split(",") if s.strip()]
        known = {label.split()[0]: label for label in DEFAULT_SPECS}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            print(f"structmat demo: unknown structure(s) {unknown}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
        specs = {known[w]: DEFAULT_SPECS[known[w]] for w in wanted}
    model = load_minilm()
    print(f"MiniLM (all-MiniLM-L6-v2) from {minilm_dir()}: {sum(p.numel() for p in model.parameters()):,} params")
    weights = {
        "attention.query": model.encoder.layer[args.layer].attention.self.query.weight.detach(),
        "mlp.intermediate": model.encoder.layer[args.layer].intermediate.dense.weight.detach(),
    }
    rows = []
    for name, w in weights.items():
        print(f"projecting layer {args.layer} {name} {tuple(w.shape)} at {args.ratio:.0%} of dense params ...",
              flush=True)
        rows += project_all(name, w, ratio=args.ratio, tokens=args.tokens, repeats=args.repeats, specs=specs)
    print()
    print(format_table(rows))
    print(f"\nforward time: median of {args.repeats} runs on {args.tokens} tokens, this machine "
          f"({torch.get_num_threads()} CPU threads); a ratio > 1 is faster than dense. CPU timings show "
          "correctness of the cost model, not GPU speed.")
    path = write_json(Path(args.out) / "demo.json", {
        "metrics": rows_as_dicts(rows),
        "run_info": run_info(vars(args), seed=args.seed, device="cpu"),
    })
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structmat", description="Structured matrices for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="project real MiniLM weights onto every structure and print the cost table")
    demo.add_argument("--ratio", type=float, default=0.5, help="fraction of the dense parameters (default 0.5)")
    demo.add_argument("--layer", type=int, default=0, help="which of MiniLM's 6 layers (default 0)")
    demo.add_argument("--tokens", type=int, default=256, help="tokens in the timing batch (default 256)")
    demo.add_argument("--repeats", type=int, default=20, help="timing repeats (default 20)")
    demo.add_argument("--structures", default="", help="comma-separated subset, e.g. dense,lowrank,monarch "
                      "(default: all of dense, lowrank, blockdiag, monarch, kron, nm, sparse, splr, product)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="structmat-out", help="folder for demo.json (default structmat-out)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ratio", 0.5) is not None and not 0 < args.ratio < 1:
        print("structmat: --ratio must lie strictly between 0 and 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
