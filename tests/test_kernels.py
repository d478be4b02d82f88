"""Kernels vs the pure-PyTorch reference: outputs and every gradient, relative RMS error, NaN-poisoned outputs.

On CPU the Triton kernels run through Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before triton is
imported, and the rest of the suite may already have imported it, so those checks run once, in a subprocess that
executes this file as a script (``python tests/test_kernels.py --interpret``) and reports JSON; the parametrized
tests below read that report. GPU-only checks are marked ``gpu`` (run with ``pytest -m gpu`` on a CUDA machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from interpreter import interpreter_report

# Every tolerance of this file: relative RMS error ||kernel - ref|| / ||ref|| against a float64 reference.
TOL = {
    "float32": 1e-5,  # IEEE fp32 dots (Triton input_precision="ieee"; TF32 only where torch allows it too)
    "float16": 5e-3,  # fp16 operands, fp32 accumulation, one rounding of the intermediate
    "bfloat16": 3e-2,  # bf16 operands, fp32 accumulation, one rounding of the intermediate
}
TOL_VS_REFERENCE_FACTOR = 2.0  # the kernel's error may be at most this times the reference's own error (+ TOL/10)

# Small awkward shapes for the interpreter: 1 token, sizes that are not multiples of the 16-wide tiles, a block
# rank c that is (aligned store path) and is not (per-element chunk path) a multiple of the tile.
MONARCH_CASES = [  # (tokens, nblocks b, in-block p, out-block u, block rank c)
    (1, 4, 8, 8, 2),
    (33, 3, 20, 12, 5),
    (17, 2, 40, 24, 16),
    (50, 4, 16, 16, 4),
]
BLOCKDIAG_CASES = [(1, 4, 8, 8), (33, 3, 20, 12), (70, 2, 40, 24)]  # (tokens, b, p, u)
# the fused many-token kernel also gets more tiles than programs, and a block rank with whole tiles and a tail
FUSED_EXTRA_CASES = [(70, 4, 24, 20, 5), (40, 2, 24, 20, 37)]


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(a).all()):
        return float("inf")  # an unwritten (NaN-poisoned) or overflowed element never passes
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300))


def _inputs(shapes, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def check_op(kind: str, case, dtype=torch.float32, device="cpu", seed=0, engine="triton", custom_op=False,
             grad_mask=None) -> dict:
    """Errors of the Triton op (output and the gradients asked for) vs a float64 reference; plus the reference's
    own. ``custom_op``: call the torch.library op directly instead of the eager autograd Function; ``grad_mask``:
    which inputs require a gradient (default all: a frozen factor must still give the right gradients of the
    rest, from a backward that skips the frozen one's GEMMs)."""
    from structmat.kernels import ops
    from structmat.structures.blockdiag import blockdiag_bmm
    from structmat.structures.monarch import monarch_multiply

    ops.POISON = True  # every output buffer starts as NaN: an element the kernel does not write fails the check
    if kind == "monarch":
        n, b, p, u, c = case
        shapes = [(n, b * p), (b, b * c, p), (b, u, b * c)]
        fn, ref_fn = ((lambda *a, engine: ops.monarch_mm(*a, engine)[0]) if custom_op else ops.monarch,
                      monarch_multiply)
    else:
        n, b, p, u = case
        shapes = [(n, b * p), (b, u, p)]
        fn, ref_fn = ops.blockdiag_mm if custom_op else ops.blockdiag, blockdiag_bmm
    mask = grad_mask or (True,) * len(shapes)
    args = [t.requires_grad_(m) for t, m in zip(_inputs(shapes, dtype, device, seed), mask)]
    args64 = [t.detach().double().requires_grad_(m) for t, m in zip(args, mask)]
    y = fn(*args, engine=engine)
    dy = _inputs([tuple(y.shape)], dtype, device, seed + 1)[0]
    grads = torch.autograd.grad(y, [t for t in args if t.requires_grad], dy)
    y64 = ref_fn(*args64)
    grads64 = torch.autograd.grad(y64, [t for t in args64 if t.requires_grad], dy.double())
    yr = ref_fn(*[t.detach().requires_grad_() for t in args])  # the reference in the same dtype, for scale
    names = ["y"] + ["d" + s for s, m in zip(["x", "R", "L"] if kind == "monarch" else ["x", "W"], mask) if m]
    out = {}
    for name, a, r in zip(names, (y, *grads), (y64, *grads64)):
        out[name] = rel_rms(a, r)
    out["ref_y"] = rel_rms(yr, y64)
    ops.POISON = False
    return out


def _interpret_report() -> dict:
    """Run in the subprocess (TRITON_INTERPRET=1): every case, every dtype the interpreter handles quickly."""
    torch.manual_seed(0)
    import structmat.kernels as K

    report = {"have_triton": K.HAVE_TRITON, "triton_error": repr(K.TRITON_IMPORT_ERROR)}
    if not K.HAVE_TRITON:
        return report
    from structmat.kernels import ops

    default_impl = dict(ops.IMPL)
    for engine in ("triton", "cublas", "default"):  # every GEMM role on each engine, then the shipped mix
        ops.IMPL.update(default_impl if engine == "default" else {k: engine for k in ops.IMPL})
        for i, case in enumerate(MONARCH_CASES):
            report[f"monarch-{i}-float32-{engine}"] = check_op("monarch", case, torch.float32, seed=i)
        for i, case in enumerate(BLOCKDIAG_CASES):
            report[f"blockdiag-{i}-float32-{engine}"] = check_op("blockdiag", case, torch.float32, seed=10 + i)
    # (bf16 is checked on the GPU only: Triton's CPU interpreter mishandles bf16 dots, seen with triton 3.9)
    for i, case in enumerate(MONARCH_CASES):  # engine="cublas": permuted roles as one call per chunk
        report[f"monarch-{i}-float32-engine_cublas"] = check_op("monarch", case, torch.float32, seed=40 + i,
                                                                engine="cublas")
    for engine in ("triton", "cublas"):  # the torch.library ops called directly (what torch.compile runs)
        report[f"monarch-1-float32-custom_op_{engine}"] = check_op("monarch", MONARCH_CASES[1], seed=50,
                                                                   engine=engine, custom_op=True)
        report[f"blockdiag-1-float32-custom_op_{engine}"] = check_op("blockdiag", BLOCKDIAG_CASES[1], seed=51,
                                                                     engine=engine, custom_op=True)
    for mask in [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]:
        tag = "".join("1" if m else "0" for m in mask)  # frozen factors: the backward skips their GEMMs
        report[f"monarch-2-float32-grads_{tag}"] = check_op("monarch", MONARCH_CASES[2], seed=60, grad_mask=mask)
    for mask in [(True, False), (False, True)]:
        tag = "".join("1" if m else "0" for m in mask)
        report[f"blockdiag-2-float32-grads_{tag}"] = check_op("blockdiag", BLOCKDIAG_CASES[2], seed=61,
                                                              grad_mask=mask)
    report["monarch-1-float16"] = check_op("monarch", MONARCH_CASES[1], torch.float16, seed=20)
    report["blockdiag-1-float16"] = check_op("blockdiag", BLOCKDIAG_CASES[1], torch.float16, seed=21)
    # Through the layers, forced onto the kernels: padding, leading batch dims, gradients of the parameters.
    from structmat.structures.blockdiag import BlockDiagonal
    from structmat.structures.monarch import Monarch

    for name, make in [("layer-monarch", lambda: Monarch(30, 22, nblocks=4, pad=True)),
                       ("layer-blockdiag", lambda: BlockDiagonal(30, 21, nblocks=3, pad=True))]:
        layer = make()
        x = torch.randn(2, 5, 30, requires_grad=True)
        with K.use_backend("reference"):
            y_ref = layer(x)
            g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *layer.parameters()])
        for backend in ("triton", "cublas"):
            with K.use_backend(backend):
                y = layer(x)
                g = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
                choice = K.LAST_CHOICE[name.split("-")[1]]
            report[f"{name}-{backend}"] = {"y": rel_rms(y, y_ref), "choice": choice,
                                           **{f"g{i}": rel_rms(a, b) for i, (a, b) in enumerate(zip(g, g_ref))}}
    # torch.compile(fullgraph=True) traces the dispatch and the custom ops without a graph break (aot_eager: the
    # same tracing as inductor, no C++ compiler needed on CI); gradients flow through the registered backward.
    for name, make in [("compile-monarch", lambda: Monarch(32, 48, nblocks=4)),
                       ("compile-blockdiag", lambda: BlockDiagonal(32, 48, nblocks=4))]:
        layer = make()
        x = torch.randn(5, 32, requires_grad=True)
        with K.use_backend("reference"):
            y_ref = layer(x)
            g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *layer.parameters()])
        for backend in ("triton", "cublas"):
            try:
                with K.use_backend(backend):
                    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
                    g = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
                report[f"{name}-{backend}"] = {"y": rel_rms(y, y_ref), "choice": K.LAST_CHOICE[name.split("-")[1]],
                                               **{f"g{i}": rel_rms(a, b) for i, (a, b) in enumerate(zip(g, g_ref))}}
            except Exception as err:
                report[f"{name}-{backend}"] = {"error": float("inf"), "message": repr(err)[:1500]}
    report.update(_fused_monarch_report())
    report.update(_nm_expand_report())
    # opcheck: schema, fake (meta) kernels and the autograd registration, as torch.compile relies on them.
    from structmat.kernels import ops

    x, R, L = _inputs([(5, 12), (3, 6, 4), (3, 4, 6)], torch.float32, "cpu", 30)
    try:
        for test in ("test_schema", "test_faketensor", "test_autograd_registration"):
            torch.library.opcheck(ops.monarch_mm, (x.requires_grad_(), R.requires_grad_(), L.requires_grad_()),
                                  test_utils=test)
            torch.library.opcheck(ops.blockdiag_mm, (x, R[:, :4, :]), test_utils=test)
        report["opcheck"] = "ok"
    except Exception as err:  # report, the test fails with the message
        report["opcheck"] = repr(err)[:2000]
    return report


def _fused_monarch_report() -> dict:
    """Monarch's one-launch many-token forward (``_triton_monarch``; opt-in ``ops.MONARCH_FUSED``): the kernel on every
    case (its persistent loop over more tiles than programs, a reused scratch slot, tails of every loop), then
    through a layer in inference and under torch.compile, where the ops must route to it."""
    import structmat.kernels as K
    from structmat.kernels import _triton_monarch as TM
    from structmat.kernels import ops
    from structmat.structures.monarch import Monarch, monarch_multiply

    report = {}
    ops.POISON = True
    for i, (n, b, p, u, c) in enumerate(MONARCH_CASES + FUSED_EXTRA_CASES):
        x, R, L = _inputs([(n, b * p), (b, b * c, p), (b, u, b * c)], torch.float32, "cpu", 70 + i)
        ref = monarch_multiply(x.double(), R.double(), L.double())
        report[f"fused-{i}"] = {"y": rel_rms(ops.monarch_fused_mm(x, R, L), ref)}
        h_two = ops._two_launch_forward(x, R, L)[1]
        for cfg in TM.INTERPRET_CONFIGS:  # (each loop form: nested, and flat over (output tile, step))
            y = ops._empty(ref.shape, x)
            tag = f"flat{int(cfg.flat)}-tail{cfg.tail}"
            report[f"fused-{i}"][tag] = rel_rms(TM.monarch_fused(x, R, L, config=cfg, out=y), ref)
            h = ops._empty(h_two.shape, x)  # (training form: the intermediate as the two launches write it)
            report[f"fused-{i}"][f"{tag}-save"] = rel_rms(TM.monarch_fused(x, R, L, config=cfg, save=h), ref)
            report[f"fused-{i}"][f"{tag}-h"] = rel_rms(h, h_two)
    ops.POISON = False
    try:
        TM.monarch_fused(torch.zeros(3, 10), torch.zeros(2, 4, 4), torch.zeros(2, 6, 4))
        report["fused-shape-error"] = "no error"
    except ValueError as err:
        report["fused-shape-error"] = str(err)
    calls = []
    real = TM.monarch_fused
    TM.monarch_fused = lambda *a, **k: calls.append(int(k.get("save") is not None)) or real(*a, **k)
    saved = ops.MONARCH_FUSED[0], ops.MONARCH_FUSED_MIN_TOKENS[0], ops.MONARCH_FUSED_DTYPES
    ops.MONARCH_FUSED[0], ops.MONARCH_FUSED_MIN_TOKENS[0] = True, 8
    ops.MONARCH_FUSED_DTYPES += (torch.float32,)  # (fp32 here: the interpreter mishandles 16-bit dots)
    try:
        layer = Monarch(48, 40, nblocks=4).eval()
        x = torch.randn(2, 9, 48)
        with torch.no_grad():
            with K.use_backend("reference"):
                y_ref = layer(x)
            for form in ("eager", "compile"):
                calls.clear()
                with K.use_backend("triton"):
                    run = torch.compile(layer, fullgraph=True, backend="aot_eager") if form == "compile" else layer
                    y = run(x)
                    few = run(x[:1, :4])  # (below the token bound: the two-launch path)
                report[f"fused-layer-{form}"] = {"y": rel_rms(y, y_ref), "few": rel_rms(few, y_ref[:1, :4]),
                                                 "calls": len(calls)}
            calls.clear()
            with K.use_backend("cublas"):  # (the cuBLAS engine never launches Triton)
                layer(x)
            report["fused-cublas-calls"] = len(calls)
        with K.use_backend("reference"):
            g_ref = torch.autograd.grad(layer(x.requires_grad_()).square().sum(), [x, *layer.parameters()])
        for form in ("eager", "compile"):  # training: the kernel writes the intermediate the backward reads
            calls.clear()
            with K.use_backend("triton"):
                run = torch.compile(layer, fullgraph=True, backend="aot_eager") if form == "compile" else layer
                y = run(x)
                g = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
            report[f"fused-grad-{form}"] = {"calls": len(calls), "saved": sum(calls),
                                             "y": rel_rms(y, y_ref),
                                             **{f"g{i}": rel_rms(a, b) for i, (a, b) in enumerate(zip(g, g_ref))}}
    finally:
        TM.monarch_fused = real
        ops.MONARCH_FUSED[0], ops.MONARCH_FUSED_MIN_TOKENS[0], ops.MONARCH_FUSED_DTYPES = saved
    x, R, L = _inputs([(5, 12), (3, 6, 4), (3, 4, 6)], torch.float32, "cpu", 31)
    try:
        for test in ("test_schema", "test_faketensor"):
            torch.library.opcheck(ops.monarch_fused_mm, (x, R, L), test_utils=test)
        report["fused-opcheck"] = "ok"
    except Exception as err:
        report["fused-opcheck"] = repr(err)[:2000]
    return report


#: N:M layers for the many-token expansion kernel: (in, out, n, m), padded where m does not divide in; awkward tile
#: tails (rows not a multiple of 32, columns not of 128) and every position width (2, 4 and 8 bits)
NM_EXPAND_CASES = [(40, 37, 2, 4), (130, 70, 1, 4), (64, 33, 4, 8), (96, 20, 2, 16), (200, 9, 3, 32)]


def _nm_expand_report() -> dict:
    """The N:M expansion kernel (``_triton_nm_expand``) against the scattered dense rows (exact: it only moves
    values), on whole layers and on a row slice; a layer at more than DECODE_MAX_TOKENS tokens in inference takes it
    (``ops.nm``), eager and under torch.compile; with a gradient it keeps the reference."""
    import structmat.kernels as K
    from structmat.kernels import _triton_nm_expand as E
    from structmat.kernels import ops
    from structmat.structures.sparse import NMSparse

    report = {}
    for i, (inp, out, n, m) in enumerate(NM_EXPAND_CASES):
        torch.manual_seed(90 + i)
        layer = NMSparse(inp, out, n=n, m=m, pad=True)
        values = layer.values.detach()
        want = values.new_zeros(out, layer.in_padded).scatter(1, layer.absolute_index(), values)
        rows = slice(3, out - 2)
        report[f"nm-expand-{i}"] = {
            "whole": bool(torch.equal(E.nm_expand(values, layer.index, n, m), want)),
            "rows": bool(torch.equal(E.nm_expand(values[rows], layer.index[rows], n, m), want[rows])),
            "half": bool(torch.equal(E.nm_expand(values, layer.index, n, m, torch.float16), want.half()))}
    layer = NMSparse(48, 40, n=2, m=4).eval()
    x = torch.randn(2, 40, 48)  # (80 tokens: above DECODE_MAX_TOKENS)
    with torch.no_grad():
        with K.use_backend("reference"):
            y_ref = layer(x)
        y = layer(x)
        choice = K.LAST_CHOICE["nm"]
        yc = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    y_grad = layer(x)  # (gradients on: the reference)
    report["nm-layer"] = {"y": rel_rms(y, y_ref), "compiled": rel_rms(yc, y_ref), "choice": choice,
                          "grad_choice": K.LAST_CHOICE["nm"], "grad_y": rel_rms(y_grad.detach(), y_ref)}
    try:
        E.nm_expand(layer.values.detach()[:, ::2], layer.index, 2, 4)
        report["nm-expand-error"] = "no error"
    except ValueError as err:
        report["nm-expand-error"] = str(err)
    try:
        for test in ("test_schema", "test_faketensor"):
            torch.library.opcheck(ops.nm_expand_op, (layer.values.detach(), layer.index, 2, 4), test_utils=test)
        report["nm-expand-opcheck"] = "ok"
    except Exception as err:
        report["nm-expand-opcheck"] = repr(err)[:2000]
    return report


@pytest.fixture(scope="module")
def interpret_report():
    report = interpreter_report(__file__)
    assert report["have_triton"], report["triton_error"]
    return report


def _check(errors: dict, dtype: str):
    tol = TOL[dtype]
    bad = {k: v for k, v in errors.items() if k not in ("ref_y", "choice", "message") and not v <= tol}
    assert not bad, f"relative RMS errors over {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize("key", [f"monarch-{i}-float32-{e}" for i in range(len(MONARCH_CASES))
                                 for e in ("triton", "cublas", "default", "engine_cublas")]
                         + [f"blockdiag-{i}-float32-{e}" for i in range(len(BLOCKDIAG_CASES))
                            for e in ("triton", "cublas", "default")]
                         + ["monarch-1-float16", "blockdiag-1-float16"]
                         + [f"{k}-1-float32-custom_op_{e}" for k in ("monarch", "blockdiag")
                            for e in ("triton", "cublas")]
                         + [f"monarch-2-float32-grads_{t}" for t in ("100", "010", "001", "101")]
                         + [f"blockdiag-2-float32-grads_{t}" for t in ("10", "01")])
def test_kernel_matches_reference_interpreter(interpret_report, key):
    _check(interpret_report[key], key.split("-")[2])


@pytest.mark.parametrize("key", ["layer-monarch-triton", "layer-blockdiag-triton", "layer-monarch-cublas",
                                 "layer-blockdiag-cublas"])
def test_layers_forced_backend_interpreter(interpret_report, key):
    errors = interpret_report[key]
    assert errors["choice"] == key.rsplit("-", 1)[1]
    _check(errors, "float32")


@pytest.mark.parametrize("key", ["compile-monarch-triton", "compile-monarch-cublas", "compile-blockdiag-triton",
                                 "compile-blockdiag-cublas"])
def test_compile_fullgraph_interpreter(interpret_report, key):
    errors = interpret_report[key]
    assert "message" not in errors, errors.get("message")
    assert errors["choice"] == key.rsplit("-", 1)[1]
    _check(errors, "float32")


@pytest.mark.parametrize("i", range(len(MONARCH_CASES) + len(FUSED_EXTRA_CASES)))
def test_monarch_fused_kernel_interpreter(interpret_report, i):
    _check(interpret_report[f"fused-{i}"], "float32")


def test_monarch_fused_grid_covers_every_tile():
    """The persistent launch's grid on a 132-SM GPU for every tile setting: at least one program, per_sm per SM at
    most, never more programs than tiles (a setting whose fields are read in the wrong order would launch none)."""
    pytest.importorskip("triton")
    from structmat.kernels import _triton_monarch as TM

    for cfg in TM.CONFIGS:
        for n, b in ((1, 4), (65, 4), (8192, 4), (8192, 8)):
            tiles, programs = TM.grid(n, b, cfg, 132)
            assert tiles == -(-n // cfg.BN) * b and programs == min(tiles, cfg.per_sm * 132) >= 1, (cfg, n, b)
    assert TM.grid(100, 4, TM.INTERPRET_CONFIGS[0], None) == (28, TM.INTERPRET_PROGRAMS)


def test_kernels_keep_to_32_bit_offsets(monkeypatch):
    """The Triton kernels index in 32-bit arithmetic: an operand reaching 2^31 elements (sizes on the meta device,
    no memory) takes cuBLAS in the grouped GEMM's roles, is never given to Monarch's fused kernel by the dispatch,
    and the kernel called directly runs the baseline or names the limit; below it nothing changes."""
    pytest.importorskip("triton")
    from structmat.kernels import _triton_monarch as TM
    from structmat.kernels import ops

    launched = []
    monkeypatch.setattr(ops, "grouped_gemm", lambda *a, **k: launched.append(a[6:]))
    R, L = (torch.empty(4, 512, 512, device="meta", dtype=torch.bfloat16) for _ in range(2))
    for n, fits in ((8192, True), (2**20, True), (2**20 + 1, False)):  # (x: n x 2048 elements, 2^31 at n = 2^20)
        x = torch.empty(n, 2048, device="meta", dtype=torch.bfloat16)
        launched.clear()
        y, h = ops._two_launch_forward(x, R, L, "triton")
        assert y.shape == (n, 2048) and len(launched) == (1 if fits else 0), (n, launched)  # (stage 2: cuBLAS)
        monkeypatch.setattr(ops, "MONARCH_FUSED", [True])
        assert ops.fused_applies(n, x, R, L, "triton") == fits
        assert TM.offsets_fit(n, R, L) == fits
    done = torch.zeros(1, device="meta")
    assert TM.monarch_fused(x, R, L, baseline=lambda: done) is done
    with pytest.raises(ValueError, match="32-bit offsets"):
        TM.monarch_fused(x, R, L)
    # the backward's roles too: dR reads x transposed (its rows n apart)
    launched.clear()
    ops._mon_backward(torch.empty(2**20 + 1, 2048, device="meta", dtype=torch.bfloat16), x, R, L, h)
    assert launched == []


def test_monarch_fused_routing_interpreter(interpret_report):
    r = interpret_report
    assert "not one Monarch product" in r["fused-shape-error"], r["fused-shape-error"]
    for form in ("eager", "compile"):  # one fused launch for the 18-token call, none for the 4-token one
        assert r[f"fused-layer-{form}"]["calls"] == 1, r[f"fused-layer-{form}"]
        _check({k: v for k, v in r[f"fused-layer-{form}"].items() if k != "calls"}, "float32")
    assert r["fused-cublas-calls"] == 0
    for form in ("eager", "compile"):  # with gradients: one launch that keeps the intermediate, exact gradients
        assert r[f"fused-grad-{form}"]["calls"] == r[f"fused-grad-{form}"]["saved"] == 1, r[f"fused-grad-{form}"]
        _check({k: v for k, v in r[f"fused-grad-{form}"].items() if k not in ("calls", "saved")}, "float32")
    assert r["fused-opcheck"] == "ok", r["fused-opcheck"]


@pytest.mark.parametrize("i", range(len(NM_EXPAND_CASES)))
def test_nm_expand_kernel_interpreter(interpret_report, i):
    assert interpret_report[f"nm-expand-{i}"] == {"whole": True, "rows": True, "half": True}


def test_nm_many_tokens_take_the_expansion_interpreter(interpret_report):
    r = interpret_report["nm-layer"]
    assert r["choice"] == "triton" and r["grad_choice"] == "reference", r
    _check({k: r[k] for k in ("y", "compiled", "grad_y")}, "float32")
    assert "not an N:M layer's rows" in interpret_report["nm-expand-error"]
    assert interpret_report["nm-expand-opcheck"] == "ok", interpret_report["nm-expand-opcheck"]


def test_opcheck_interpreter(interpret_report):
    assert interpret_report["opcheck"] == "ok", interpret_report["opcheck"]


# ---------------------------------------------------------------------------------------------------------------
# Dispatch (plain CPU, no interpreter needed)
# ---------------------------------------------------------------------------------------------------------------


def test_backend_setting_and_context_manager():
    import structmat.kernels as K

    assert K.get_backend() == "auto"
    with K.use_backend("dense"):
        assert K.get_backend() == "dense"
        with K.use_backend("reference"):
            assert K.get_backend() == "reference"
        assert K.get_backend() == "dense"
    assert K.get_backend() == "auto"
    with pytest.raises(ValueError, match="valid backends"):
        K.set_backend("cuda-magic")


@pytest.mark.parametrize("spec", ["monarch:nblocks=4", "blockdiag:nblocks=4", "lowrank:rank=5"])
def test_dense_backend_same_math_and_cache_invalidation(spec):
    import structmat.kernels as K
    from structmat.structures.base import resolve_spec, structure_class

    cfg = resolve_spec(spec, 24, 20)
    layer = structure_class(cfg.name)(24, 20, **{k: v for k, v in cfg.to_dict().items() if k != "structure"})
    layer.double()
    x = torch.randn(7, 24, dtype=torch.float64)
    with torch.no_grad():
        with K.use_backend("reference"):
            ref = layer(x)
        assert K.LAST_CHOICE[cfg.name] == "reference"  # on CPU even auto would be
        with K.use_backend("dense"):
            y = layer(x)
            assert K.LAST_CHOICE[cfg.name] == "dense"
            assert rel_rms(y, ref) < 1e-12
            for p in layer.parameters():  # an in-place update bumps _version: the cached merge must not survive
                p.mul_(1.5)
            y2 = layer(x)
        with K.use_backend("reference"):
            ref2 = layer(x)
    assert rel_rms(y2, ref2) < 1e-12 and rel_rms(y2, ref) > 1e-3
    # with parameter gradients the dense path merges differentiably: gradients equal the reference's
    with K.use_backend("dense"):
        g = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    with K.use_backend("reference"):
        g_ref = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    for a, b in zip(g, g_ref):
        assert rel_rms(a, b) < 1e-10


def test_cost_model_picks_by_shape_and_mode():
    """The automatic choice's shape (H200-host constants): large products go to the kernels, and never to the
    dense merge."""
    from structmat.kernels.dispatch import choose

    def monarch(n, f, training, dtype=torch.bfloat16):
        b = 4
        c = f // b // b
        numel = 2 * b * b * c * (f // b)
        return choose("monarch", n, f, f, 2.0 * n * numel, 2 * (numel + n * 4 * f), dtype, b, training, training,
                      True)

    assert monarch(8192, 4096, False) in ("triton", "cublas")
    assert monarch(8192, 4096, True) in ("triton", "cublas")
    assert monarch(16384, 8192, True) in ("triton", "cublas")
    # never the dense merge (a hidden dense copy; merge_for_inference is the explicit choice): tests/test_inference.py
    assert all(monarch(n, f, t) != "dense" for n in (1, 16, 2048) for f in (1024, 4096) for t in (False, True))


def test_monarch_block_rank_off_the_triton_tile_never_takes_triton(monkeypatch):
    """A Monarch whose block rank is not a multiple of the Triton kernel's narrowest tile takes the scattered store
    there (measured 2.4x slower than cuBLAS at block rank 200): auto picks another path for it, for prefill and
    training alike, while an aligned block rank keeps the cost model's choice; forcing "triton" still works."""
    from structmat.kernels import dispatch
    from structmat.structures import build

    if dispatch.ops is None:
        pytest.skip("needs the Triton ops module (triton installed)")
    monkeypatch.setattr(dispatch, "INTERPRET", True)  # decide as on a GPU, from shapes only (no product runs)
    monkeypatch.setattr(dispatch, "_decisions", {})
    unaligned = build("monarch:nblocks=4,ratio=0.5", 2048, 8192, bias=False).to(torch.bfloat16)
    aligned = build("monarch:nblocks=4,ratio=0.5", 2048, 2048, bias=False).to(torch.bfloat16)
    assert unaligned.c % dispatch.TRITON_MONARCH_CHUNK and aligned.c % dispatch.TRITON_MONARCH_CHUNK == 0
    x = torch.empty(8192, 2048, dtype=torch.bfloat16)
    with torch.no_grad():
        assert dispatch._monarch_choice(x, unaligned.R, unaligned.L) == "cublas"
        b, bc, p = aligned.R.shape
        numel = aligned.R.numel() + aligned.L.numel()
        free = dispatch.choose("monarch", 8192, 2048, 2048, 2.0 * 8192 * numel,
                               2 * (numel + 8192 * (b * p + 2 * b * bc + b * aligned.L.shape[1])), torch.bfloat16,
                               b, False, False, True)
        assert dispatch._monarch_choice(x, aligned.R, aligned.L) == free  # an aligned rank: nothing excluded
        # a wide aligned block rank at many tokens: cuBLAS (measured faster there), Triton below that token count
        wide = build("monarch:nblocks=4,ratio=0.5", 4096, 4096, bias=False).to(torch.bfloat16)
        assert wide.c >= dispatch.CUBLAS_MONARCH_MIN_CHUNK and wide.c % dispatch.TRITON_MONARCH_CHUNK == 0
        many = torch.empty(dispatch.CUBLAS_MONARCH_MIN_TOKENS, 4096, dtype=torch.bfloat16)
        assert dispatch._monarch_choice(many, wide.R, wide.L) == "cublas"
        assert dispatch._monarch_choice(many[:1024], wide.R, wide.L) == "triton"
        narrow = build("monarch:nblocks=8,ratio=0.25", 4096, 4096, bias=False).to(torch.bfloat16)
        assert narrow.c < dispatch.CUBLAS_MONARCH_MIN_CHUNK
        assert dispatch._monarch_choice(many, narrow.R, narrow.L) == "triton"
    with torch.enable_grad():
        assert dispatch._monarch_choice(x.requires_grad_(), unaligned.R, unaligned.L) != "triton"
    with dispatch.use_backend("triton"), torch.no_grad():
        assert dispatch._monarch_choice(x, unaligned.R, unaligned.L) == "triton"
    # with the opt-in one-launch inference forward (no chunked store) nothing is excluded in inference from its
    # token bound on; training still excludes the scattered store
    monkeypatch.setattr(dispatch.ops, "MONARCH_FUSED", [True])
    monkeypatch.setattr(dispatch, "_decisions", {})
    with torch.no_grad():
        assert dispatch._monarch_choice(x, unaligned.R, unaligned.L) == "triton"
        small = x[:dispatch.ops.MONARCH_FUSED_MIN_TOKENS[0] - 1]
        if small.shape[0] > dispatch.TRITON_CHUNK_FREE_TOKENS:
            assert dispatch._monarch_choice(small, unaligned.R, unaligned.L) != "triton"
    with torch.enable_grad():
        assert dispatch._monarch_choice(x.requires_grad_(), unaligned.R, unaligned.L) != "triton"


def test_monarch_few_token_choice_by_stage(monkeypatch):
    """At 2-64 tokens, captured in a CUDA graph, Monarch's path follows its two weights (dispatch.MONARCH_STAGE_COST):
    a wide second stage (2048->8192) takes the Triton path, also at a block rank off its tile (the scattered store
    is a few rows there), a long first stage (8192->2048) and the square layer decode's gemv pair: what measured
    fastest on the H200 (decode-layers-20261204T165753Z.json, cold us at 2 / 4 / 16 tokens: 2048->8192 triton
    10.4 / 11.3 / 12.6 vs decode 14.1 / 14.1 / 13.9; 8192->2048 decode 13.1 / 13.0 / 13.1 vs triton 13.1 / 13.1 /
    14.4; 2048^2 decode 7.2 / 7.3 / 7.2 vs triton 8.6 / 7.8 / 8.6). Above 64 tokens the off-tile rank excludes
    Triton again, and eager calls (host-bound) keep decode."""
    from structmat.kernels import dispatch
    from structmat.structures import build

    if dispatch.ops is None:
        pytest.skip("needs the Triton ops module (triton installed)")
    monkeypatch.setattr(dispatch, "INTERPRET", True)  # decide as on a GPU, from shapes only (no product runs)
    monkeypatch.setattr(dispatch, "_decisions", {})
    layers = {shape: build("monarch:nblocks=4,ratio=0.5", *shape, bias=False).to(torch.bfloat16)
              for shape in ((2048, 8192), (8192, 2048), (2048, 2048))}
    want = {(2048, 8192): "triton", (8192, 2048): "decode", (2048, 2048): "decode"}
    with torch.no_grad():
        for graphed in (True, False):
            monkeypatch.setattr(dispatch, "_GRAPHED", [graphed])
            for (inp, out), layer in layers.items():
                for n in (2, 4, 16, 64):
                    got = dispatch._monarch_choice(torch.empty(n, inp, dtype=torch.bfloat16), layer.R, layer.L)
                    assert got == (want[(inp, out)] if graphed else "decode"), (inp, out, n, graphed, got)
        monkeypatch.setattr(dispatch, "_GRAPHED", [True])
        wide = layers[(2048, 8192)]
        assert wide.c % dispatch.TRITON_MONARCH_CHUNK  # (block rank 200: off the tile)
        assert dispatch._monarch_choice(torch.empty(65, 2048, dtype=torch.bfloat16), wide.R, wide.L) != "triton"


def test_auto_on_cpu_is_reference():
    import structmat.kernels as K
    from structmat.structures.monarch import Monarch

    layer = Monarch(16, 16, nblocks=4)
    layer(torch.randn(3, 16))
    assert K.LAST_CHOICE["monarch"] == "reference"


def test_import_without_triton():
    """The package must import and compute on a machine without Triton (everything falls through)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, structmat.kernels as K\n"
            "from structmat.structures.monarch import Monarch\n"
            "assert not K.HAVE_TRITON\n"
            "K.set_backend('triton')\n"
            "y = Monarch(16, 16, nblocks=4)(torch.randn(3, 16)); assert torch.isfinite(y).all()\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# GPU (pytest -m gpu on a CUDA machine)
# ---------------------------------------------------------------------------------------------------------------

GPU_MONARCH = [(1, 4, 256, 256, 64), (1000, 4, 300, 200, 75), (4096, 4, 1024, 1024, 256), (257, 8, 128, 512, 16)]
GPU_BLOCKDIAG = [(1, 4, 256, 256), (1000, 3, 300, 200), (4096, 4, 1024, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("kind,case", [("monarch", c) for c in GPU_MONARCH] + [("blockdiag", c) for c in GPU_BLOCKDIAG])
@pytest.mark.parametrize("engine", ["triton", "cublas"])
def test_kernel_matches_reference_gpu(kind, case, dtype, engine, monkeypatch):
    from structmat.kernels import _triton_gemm

    monkeypatch.setattr(_triton_gemm, "AUTOTUNE", case[0] == 4096 and dtype == "bfloat16")  # tune the big case only
    errors = check_op(kind, case, getattr(torch, dtype), device="cuda", seed=sum(case) % 1000, engine=engine)
    _check(errors, dtype)
    # and no worse than the reference in the same dtype (a loose factor: the rounding order differs)
    assert errors["y"] <= TOL_VS_REFERENCE_FACTOR * errors["ref_y"] + TOL[dtype] / 10, errors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("b,p,c,u", [(4, 512, 128, 512), (4, 512, 200, 2048), (4, 2048, 200, 512), (3, 40, 5, 24)])
def test_monarch_fused_matches_reference_gpu(b, p, c, u, dtype):
    """The one-launch many-token Monarch forward at every tile setting (bf16; fp16 the one it picks), on the bench
    model's block shapes and an awkward one (a block rank off 8: no ALIGN8), a token count off every tile: against float64
    and no worse than the two-launch forward in the same dtype (a loose factor: the rounding order differs)."""
    from structmat.kernels import _triton_monarch as TM
    from structmat.kernels import ops
    from structmat.structures.monarch import monarch_multiply

    dt = getattr(torch, dtype)
    x, R, L = _inputs([(1000, b * p), (b, b * c, p), (b, u, b * c)], dt, "cuda", b + p + c + u)
    ref = monarch_multiply(x.double(), R.double(), L.double())
    two = rel_rms(ops._two_launch_forward(x, R, L, "triton")[0], ref)
    for cfg in [*TM.CONFIGS, None] if dtype == "bfloat16" else [None]:  # (fp16: the setting it picks)
        err = rel_rms(TM.monarch_fused(x, R, L, config=cfg), ref)
        assert err <= TOL[dtype] and err <= TOL_VS_REFERENCE_FACTOR * two + TOL[dtype] / 10, (cfg, err, two)
    h_two = ops._two_launch_forward(x, R, L, "triton")[1]
    for cfg in [*TM.SAVE_CONFIGS, None] if dtype == "bfloat16" else [None]:  # the training form
        h = torch.full_like(h_two, float("nan"))
        err = rel_rms(TM.monarch_fused(x, R, L, config=cfg, save=h), ref)
        assert err <= TOL[dtype] and err <= TOL_VS_REFERENCE_FACTOR * two + TOL[dtype] / 10, (cfg, err, two)
        assert rel_rms(h, h_two) <= TOL[dtype], cfg  # (the same products, each rounded once: in the order it sums)
    # the measured choice against a baseline: one that costs nothing wins and is what runs from then on; one far
    # slower loses (the kernel's own output)
    done = torch.zeros(1, device="cuda")
    assert TM.monarch_fused(x, R, L, baseline=lambda: done) is done
    assert TM.monarch_fused(x, R, L, baseline=lambda: done) is done
    slow = lambda: (torch.cuda._sleep(50_000_000), done)[1]  # noqa: E731
    y = TM.monarch_fused(x[:500], R, L, baseline=slow)  # (another shape key: 500 tokens, not 1000)
    assert y is not done and rel_rms(y, ref[:500]) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("inp,out,n,m", [(2048, 8192, 2, 4), (8192, 2048, 2, 4), (1000, 301, 1, 4), (520, 77, 4, 8)])
def test_nm_many_tokens_expansion_gpu(inp, out, n, m, dtype):
    """The N:M expansion kernel on the GPU: exact dense rows (bench shapes and awkward ones), and a layer's many-token
    inference forward through it (``ops.nm``) equal to the reference's, which rebuilds the same tiles in PyTorch."""
    import structmat.kernels as K
    from structmat.kernels import _triton_nm_expand as E
    from structmat.structures.sparse import NMSparse

    torch.manual_seed(inp + out)
    layer = NMSparse(inp, out, n=n, m=m, pad=True).to("cuda", getattr(torch, dtype)).eval()
    values = layer.values.detach()
    want = values.new_zeros(out, layer.in_padded).scatter(1, layer.absolute_index(), values)
    assert torch.equal(E.nm_expand(values, layer.index, n, m), want)
    x = torch.randn(300, inp, device="cuda", dtype=values.dtype)
    with torch.no_grad():
        with K.use_backend("reference"):
            ref = layer(x)
        y = layer(x)
    assert K.LAST_CHOICE["nm"] == "triton"
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # (the same tiles, the same GEMMs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cublas", "dense", "auto"])
@pytest.mark.parametrize("tokens", [1, 16, 2048])
def test_backends_agree_gpu(backend, tokens):
    import structmat.kernels as K
    from structmat.structures.lowrank import LowRank
    from structmat.structures.monarch import Monarch

    for layer in (Monarch(1024, 1024, nblocks=4), LowRank(1024, 1024, rank=128)):
        layer = layer.cuda().to(torch.bfloat16)
        x = torch.randn(2, tokens, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = layer.double()(x.double())
            layer.to(torch.bfloat16)
            with K.use_backend(backend):
                y = layer(x)
        assert rel_rms(y, ref) < TOL["bfloat16"]


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["monarch:nblocks=4", "blockdiag:nblocks=4", "lowrank:rank=128"])
def test_dense_merge_in_training_gpu(spec):
    """The per-step differentiable merge in the compute dtype (bf16 on CUDA): output and every gradient match a
    float64 reference within bf16 tolerance."""
    import structmat.kernels as K
    from structmat.structures.base import resolve_spec, structure_class

    cfg = resolve_spec(spec, 1024, 1024)
    layer = structure_class(cfg.name)(1024, 1024, **{k: v for k, v in cfg.to_dict().items() if k != "structure"})
    layer = layer.cuda().double()
    x = torch.randn(64, 1024, device="cuda", dtype=torch.float64, requires_grad=True)
    with K.use_backend("reference"):
        y_ref = layer(x)
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *layer.parameters()])
    layer.to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    with K.use_backend("dense"):
        y = layer(xb)
        assert K.LAST_CHOICE[cfg.name] == "dense"
        g = torch.autograd.grad(y.float().square().sum(), [xb, *layer.parameters()])
    assert rel_rms(y, y_ref) < TOL["bfloat16"]
    for a, b in zip(g, g_ref):
        assert rel_rms(a, b) < TOL["bfloat16"]


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu():
    import structmat.kernels as K
    from structmat.structures.monarch import Monarch

    layer = Monarch(512, 768, nblocks=4).cuda().to(torch.bfloat16)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with K.use_backend("triton"):
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x)
        g = torch.autograd.grad(y.float().square().sum(), [x, layer.R, layer.L])
    with K.use_backend("reference"):
        y_ref = layer(x)
        g_ref = torch.autograd.grad(y_ref.float().square().sum(), [x, layer.R, layer.L])
    assert rel_rms(y, y_ref) < TOL["bfloat16"]
    for a, b in zip(g, g_ref):
        assert rel_rms(a, b) < TOL["bfloat16"]


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(json.dumps(_interpret_report()))
