"""Per-layer decode cost (issue 12): each structured layer of the bench-infer shape at 1 and 16 tokens, every way it
can run, timed as a model runs it.

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/decode_layers.py --out DIR``

For the layer shapes of the bench-infer Llama (2048x2048, 2048->8192, 8192->2048; bf16) and each structure at 50%
(low-rank, Monarch nb=4, block-diagonal nb=4, 2:4), the candidates:
  ``dense``      ``F.linear`` on a dense weight of the same shape (cuBLAS)
  ``decode``     structmat's Triton decode kernels        ``reference``  the structure's PyTorch definition (for
  ``triton`` / ``cublas``  the many-token custom ops      low-rank: two cuBLAS GEMMs; block-diagonal: one bmm)
  ``auto``       what the dispatch picks                  ``semi24``     torch's 2:4 semi-structured ``F.linear``
  ``fill``       a zero fill of the output: the fixed cost of one launch inside a graph (no weight read)
  ``lean``       an eager-lean aten call (``lean()``: low-rank as one ``multi_dot``, block-diagonal and Monarch as
                 bmm on views made once): fewest torch calls, for eager decode
  ``decode@...`` (1 token) the gemv decode kernel with other launch settings (``VARIANTS``): which one streams best
each timed three ways:
  ``cold_us``    a CUDA graph that runs the candidate over K distinct copies of the layer whose weights together
                 exceed 256 MB (5x the L2 cache): every call reads its weight from HBM, as in a model (per call)
  ``hot_us``     a CUDA graph of 24 calls on one copy: the weight stays in L2 between calls (what a single-layer
                 microbenchmark reports; it flatters small weights)
  ``eager_us``   wall time per call of a Python loop without a graph (1 token only): what eager decode pays per
                 layer on this host (launch + dispatch)
Writes ``decode-layers-<UTC>.json`` after every shape.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import sys
import time
import traceback
from pathlib import Path

import _common
import torch
import torch.nn.functional as F

DTYPE = torch.bfloat16
COLD_BYTES = 256e6
DEVICE = "cuda"
#: Launch variants of the decode kernels, timed beside the shipped one ("decode"): name -> settings of
#: structmat.kernels._triton_decode (``_common.set_knobs``): the older two-launch gemv form (FUSED=False), the fused
#: kernel's tile budget (weight elements per program), warps and pipeline stages
VARIANTS = {"decode@two": dict(FUSED=False), "decode@tile4k": dict(FUSED_TILE=4096),
            "decode@tile16k": dict(FUSED_TILE=16384), "decode@w8": dict(FUSED_WARPS=8),
            "decode@st2": dict(FUSED_META={"num_stages": 2}), "decode@spinld": dict(FUSED_META={"SPIN_LOAD": True})}
#: The N:M kernels' variants (2:4 rows): at one token the row kernel (``_decode_nm_row``) with row blocks of 2 or 8,
#: 256 or 512 values per iteration wherever, 2 or 8 warps, without its prefetch, splits up to 16 or each at least 2
#: tiles long, and the expanded-tile kernel instead (SMALL_TOKENS=0); above one token the expanded-tile kernel without
#: its split; 128 values per iteration with row blocks of 2, 4 or 8, and with 2 warps (round 7 also timed the
#: expanded-tile kernel's shift expansion, since dropped, against its compare-and-select: NM_PRMT=False; rounds 1-3 swept row blocks 4-32, 128-512 values and warps; session 10's variants of the
#: gather kernel it replaced are in the git history)
NM_VARIANTS = {"decode@bm2": dict(NM_ROW_BLOCK_M=2), "decode@bm8": dict(NM_ROW_BLOCK_M=8),
               "decode@bj256": dict(NM_ROW_BLOCK_J=256), "decode@bj512": dict(NM_ROW_BLOCK_J=512),
               "decode@w2": dict(NM_ROW_WARPS=2), "decode@w8": dict(NM_ROW_WARPS=8),
               "decode@nopf": dict(NM_ROW_PREFETCH=False), "decode@s16": dict(NM_ROW_MAX_SPLITS=16),
               "decode@min2": dict(NM_ROW_MIN_SPLIT_TILES=2),
               "decode@nosplit": dict(NM_ROW_MAX_SPLITS=1, NM_MAX_SPLITS=1), "decode@tile": dict(SMALL_TOKENS=0),
               "decode@bj128": dict(NM_ROW_BLOCK_J=128), "decode@bm2bj128": dict(NM_ROW_BLOCK_M=2, NM_ROW_BLOCK_J=128),
               "decode@bm8bj128": dict(NM_ROW_BLOCK_M=8, NM_ROW_BLOCK_J=128),
               "decode@bj128w2": dict(NM_ROW_BLOCK_J=128, NM_ROW_WARPS=2),
               # above one token: the expanded-tile kernel's programs per SM (8 since session 12) and warps per
               # program up to 16 tokens (2 since session 12; 4 before), at 64 tokens 2 warps too (session 12 rounds
               # 1-3 also timed 2-4 tiles in flight, an unmasked form on whole tiles, 8-16 programs per SM of 4 warps:
               # slower or no faster)
               "decode@t4w4": dict(NM_TARGET_PROGRAMS=4, NM_SMALL_WARPS=4), "decode@w1": dict(NM_SMALL_WARPS=1),
               "decode@t16w1": dict(NM_TARGET_PROGRAMS=16, NM_SMALL_WARPS=1), "decode@t4w2": dict(NM_TARGET_PROGRAMS=4),
               "decode@wide-w2": dict(NM_META={"num_warps": 2}),
               # the dense tile 64 or 256 inputs wide (128), the input tile's pipeline 2 or 4 deep (3)
               "decode@tk64": dict(NM_TILE_K=64), "decode@tk256": dict(NM_TILE_K=256),
               "decode@st2": dict(NM_META={"num_stages": 2}), "decode@st4": dict(NM_META={"num_stages": 4}),
               # (session 15) 2:4's byte-permute kernel up to 1 / 2 / 8 tokens a program (4), or not at all (the
               # gather kernel at one token, the expanded tile above), and its tiles expanded by compares
               "decode@r1": dict(NM24_ROW_TOKENS=1), "decode@r2": dict(NM24_ROW_TOKENS=2),
               "decode@r8": dict(NM24_ROW_TOKENS=8), "decode@gather": dict(NM24_ROW=False),
               "decode@noperm": dict(NM24_PERMUTE=False),
               # (session 16) the sparse tensor cores (mma.sp, ``_gluon_nm24``) off, at every token count, up to 16
               # tokens, with 4, 8 or 16 warps
               "decode@nosp": dict(NM24_SP=False), "decode@sp1": dict(NM24_SP_TOKENS=(1, 64)),
               "decode@sp16": dict(NM24_SP_TOKENS=(3, 16)),
               "decode@spw4": dict(NM24_SP_WARPS=4), "decode@spw8": dict(NM24_SP_WARPS=8),
               "decode@spw16": dict(NM24_SP_WARPS=16),
               # its four blocks in flight (2), up to 32 tokens in programs of 16 (two n8 tiles) or of 8
               "decode@d4": dict(NM24_SP_DEPTH=4), "decode@sp32": dict(NM24_SP_TOKENS=(3, 32)),
               "decode@sp32tb8": dict(NM24_SP_TOKENS=(3, 32), NM24_SP_TOKEN_BLOCK=8),
               "decode@sp32tb8d4": dict(NM24_SP_TOKENS=(3, 32), NM24_SP_TOKEN_BLOCK=8, NM24_SP_DEPTH=4),
               # the inputs gathered by each lane instead of put in fragment order first; up to 64 tokens
               "decode@noprep": dict(NM24_SP_PREP=False), "decode@sp64": dict(NM24_SP_TOKENS=(3, 64))}
#: The two-stage kernels above one token (low-rank, Monarch): the first stage's splits summed by the second stage
#: (session 10's form: unsplit, or split up to 2 ways, ``_triton_decode.MULTI_TOKEN_SPLITS``), or in the first
#: stage's kernel (low-rank's default since session 12, ``MULTI_TOKEN_REDUCE``), its second stage a plain launch or
#: the PDL-joined ``_pdl_stage2_dot`` that loads its weight first (``MULTI_TOKEN_PDL``). (Round 4 of session 10 also
#: timed taller second-stage row blocks, a knob since removed: they helped only with 2 splits; session 12 round 1
#: split up to 2 ways and aimed at 8 programs per SM, round 2 joined the two gemv launches by programmatic dependent
#: launch, the second waiting before any load: no better, or slower, low-rank 2048->8192 at 16 tokens 14.2 -> 18.3 us.
#: Session 14 round 4 timed the PDL pair at every second-stage size and its second stage with smaller tiles, rows x
#: reduction 64x128, 32x128, 32x256, 64x256 on 8 warps and 16x128 on 4 (58-110 registers against 182): slower than
#: the shipped choice at every shape, e.g. 2048->8192 at 16 tokens 13.0-15.3 us against cuBLAS's 11.8 (dense 10.6);
#: ``benchmarks/experiments/patches/s14_pdl_dot_tile.diff`` restores those variants.)
MULTI_VARIANTS = {"decode@unreduced": dict(MULTI_TOKEN_REDUCE=False),
                  "decode@unpaired": dict(MULTI_TOKEN_PDL=False),
                  # the gemv kernel's warps, pipeline depth and reduction tile (K >= 2048) for both stages
                  "decode@gemv-w8": dict(GEMV_META={"num_warps": 8}),
                  "decode@gemv-st2": dict(GEMV_META={"num_stages": 2}), "decode@gemv-bk128": dict(BLOCK_K_LARGE=128),
                  # (session 20) the PDL pair at any second-stage size, and 2 / 8 programs per SM (4)
                  "decode@pair-any": dict(PDL_DOT_MAX_BYTES=1e12), "decode@tp2": dict(TARGET_PROGRAMS=2),
                  "decode@tp8": dict(TARGET_PROGRAMS=8)}
BACKENDS = {"lowrank": ("decode", "reference"), "monarch": ("decode", "triton", "cublas", "reference"),
            "blockdiag": ("decode", "triton", "cublas", "reference"), "nm24": ("decode", "reference")}


def graph_us(fns, reps: int = 10) -> float:
    """Microseconds per call of the calls ``fns`` (run in order) captured in one CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    del g
    return start.elapsed_time(end) * 1e3 / (reps * len(fns))


def cycle(items, calls: int = 24):
    return [items[i % len(items)] for i in range(max(calls, len(items)))]


def measure(make, nbytes: int, x, eager: bool) -> dict:
    """``make()`` builds one copy of a candidate (a zero-argument callable on ``x``)."""
    k = int(min(128, max(2, math.ceil(COLD_BYTES / max(nbytes, 1)))))
    copies = [make() for _ in range(k)]
    row = {"copies": k, "cold_us": graph_us(cycle(copies)), "hot_us": graph_us(cycle(copies[:1]))}
    if eager:
        row["eager_us"] = _common.wall_us(copies[0], n=200, warmup=20)
    del copies
    return row


def lean(layer, x):
    """An eager-lean aten call of the layer's product for x (n, in) (as few torch calls as the math allows, operand
    views made once): the candidate for eager decode, where each torch call costs host time."""
    n = x.shape[0]
    if layer.name == "lowrank":
        Vt, Ut = layer.V.detach().t(), layer.U.detach().t()
        return lambda: torch.linalg.multi_dot([x, Vt, Ut])
    if layer.name == "blockdiag":
        W = layer.weight.detach()
        b, u, p = W.shape
        Wt = W.transpose(1, 2)
        if n == 1:
            return lambda: torch.bmm(x.view(b, 1, p), Wt).view(1, b * u)
        return lambda: torch.bmm(x.view(n, b, p).transpose(0, 1), Wt).transpose(0, 1).reshape(n, b * u)
    if layer.name == "monarch" and n == 1:
        R, L = layer.R.detach(), layer.L.detach()
        b, bc, p = R.shape
        c, u = bc // b, L.shape[1]
        Rt, Lt = R.transpose(1, 2), L.transpose(1, 2)
        return lambda: torch.bmm(torch.bmm(x.view(b, 1, p), Rt).view(b, b, c).transpose(0, 1).reshape(b, 1, bc),
                                 Lt).view(1, b * u)
    return None


def variant(settings: dict):
    """Apply a VARIANTS / NM_VARIANTS / MULTI_VARIANTS entry to the decode kernels' module (its plan caches dropped);
    returns the undo."""
    from structmat.kernels import _triton_decode as TD

    saved = _common.set_knobs(TD, settings)
    TD.clear_plans()
    return lambda: (_common.restore_knobs(TD, saved), TD.clear_plans())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--structures", default="lowrank,monarch,blockdiag,nm24")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--shapes", default="2048x2048,2048x8192,8192x2048",
                    help="in x out per layer (default: the bench-infer Llama's); --structures also takes specs, e.g. "
                         "monarch:nblocks=8 (`structmat bench kernels`' rows)")
    ap.add_argument("--variants-only", default="", help="comma-separated variant names: time only these")
    ap.add_argument("--no-variants", dest="variants", action="store_false",
                    help="skip the decode kernels' launch variants (VARIANTS)")
    args = ap.parse_args()
    import structmat.kernels as K
    from decode_probe import layer_for, nbytes
    from structmat.eval.results import run_info, write_json

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"decode-layers-{stamp}.json"
    rep: dict = {"rows": [], "errors": [], "cold_bytes": COLD_BYTES}
    t0 = time.time()
    tokens = [int(t) for t in args.tokens.split(",")]
    for inp, out in [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]:
        for n in tokens:
            x = torch.randn(n, inp, device=DEVICE, dtype=DTYPE)
            eager = n == 1
            base = dict(inp=inp, out=out, tokens=n)
            with torch.no_grad():
                try:
                    W0 = torch.randn(out, inp, device=DEVICE, dtype=DTYPE) * inp ** -0.5
                    r = measure(lambda: (lambda W=W0.clone(): F.linear(x, W)), W0.numel() * 2, x, eager)
                    rep["rows"].append(dict(base, structure="dense", candidate="dense", weight_bytes=W0.numel() * 2, **r))
                    r = measure(lambda: (lambda: torch.zeros(n, out, device=DEVICE, dtype=DTYPE)), 0, x, eager)
                    rep["rows"].append(dict(base, structure="dense", candidate="fill", weight_bytes=0, **r))
                    del W0
                except Exception:
                    rep["errors"].append({"case": f"dense-{inp}x{out}-{n}", "trace": traceback.format_exc()[-2000:]})
                for s in args.structures.split(","):
                    layer = layer_for(s, inp, out)
                    wb = nbytes(layer)
                    cands = {be: be for be in (*BACKENDS[s.split(":")[0]], "auto")}
                    if s == "nm24":
                        cands["semi24"] = None
                        if args.variants:
                            cands.update({v: "decode" for v in NM_VARIANTS
                                          if not args.variants_only or v in args.variants_only.split(",")})
                    elif args.variants and n == 1:
                        cands.update({v: "decode" for v in VARIANTS})
                    elif args.variants and s.split(":")[0] in ("lowrank", "monarch"):
                        cands.update({v: "decode" for v in MULTI_VARIANTS})
                    if lean(layer, x) is not None:
                        cands["lean"] = "lean"
                    exact = F.linear(x.double(), layer.to_dense().double())  # (each candidate's error against it)
                    for cand, be in cands.items():
                        settings = (VARIANTS.get(cand) or MULTI_VARIANTS.get(cand)
                                    or (NM_VARIANTS.get(cand) if s == "nm24" else None))
                        undo = variant(settings) if settings else (lambda: None)
                        try:
                            if be == "lean":
                                ref = F.linear(x.float(), layer.to_dense().float())
                                r = measure(lambda: lean(copy.deepcopy(layer), x), wb, x, eager)
                                r["err"] = ((lean(layer, x)().float() - ref).norm() / ref.norm()).item()
                            elif be is None:
                                from torch.sparse import to_sparse_semi_structured

                                Wd = layer.to_dense().to(DTYPE).contiguous()
                                make = lambda: (lambda S=to_sparse_semi_structured(Wd.clone()): F.linear(x, S))  # noqa
                                r = measure(make, wb, x, eager)
                            else:
                                with K.use_backend(be):
                                    make = lambda: (lambda L=copy.deepcopy(layer): L(x))  # noqa: E731
                                    r = measure(make, wb, x, eager)
                                    got = copy.deepcopy(layer)(x)  # (a fresh plan: this candidate's settings)
                                    r["choice"] = K.LAST_CHOICE.get(layer.name, "?")
                                    r["err"] = ((got.double() - exact).norm() / exact.norm()).item()
                            rep["rows"].append(dict(base, structure=s, spec=layer.spec, candidate=cand,
                                                    weight_bytes=wb, **r))
                        except Exception:
                            rep["errors"].append({"case": f"{s}-{cand}-{inp}x{out}-{n}",
                                                  "trace": traceback.format_exc()[-2000:]})
                        finally:
                            undo()
                    del layer
            dense = {(r["inp"], r["out"], r["tokens"]): r for r in rep["rows"] if r["candidate"] == "dense"}
            for r in rep["rows"]:
                d = dense.get((r["inp"], r["out"], r["tokens"]))
                if d is not None:
                    r["cold_vs_dense"] = d["cold_us"] / r["cold_us"]
                    r["hot_vs_dense"] = d["hot_us"] / r["hot_us"]
                    r["cold_gbs"] = r["weight_bytes"] / r["cold_us"] * 1e-3
            for r in rep["rows"]:
                if r["inp"] == inp and r["out"] == out and r["tokens"] == n:
                    print(f"{inp}x{out} n={n:2d} {r['structure']:9s} {r['candidate']:9s} cold {r['cold_us']:7.1f}us "
                          f"hot {r['hot_us']:7.1f}us eager {r.get('eager_us', 0):6.1f}us "
                          f"x{r.get('cold_vs_dense', 0):.2f} {r.get('choice', '')}", flush=True)
            rep["seconds"] = time.time() - t0
            rep["run_info"] = run_info(vars(args), device="cuda")
            write_json(path, rep)
    print(f"wrote {path} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
