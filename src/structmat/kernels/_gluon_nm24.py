"""2:4 sparse products on the sparse tensor cores (``mma.sp``, sm_80+): a few tokens, every weight byte read once.

The expanded-tile kernel (``_triton_decode._decode_nm``) rebuilds each dense tile on chip before a dense ``tl.dot``:
a dozen instructions per dense weight, whatever the token count, so above two tokens it runs at 0.4-0.8x dense.
The sparse tensor cores take the compressed form as it is stored: ``mma.sp.m16n8k32`` multiplies a 16 x 32 2:4
tile, given as its 16 x 16 kept values and 4-bit codes (one per group: first position | second << 2), by 32 x 8
inputs. structmat's layout is already that form: a row's kept pair of group q is one int32 of ``values``
(``V[r, 2q:2q+2]``) and its code is nibble q of the packed positions, groups in order. Nothing is expanded; each
thread loads its fragment registers straight from HBM.

Fragments (PTX ISA, ``mma.sp`` m16n8k32, 16-bit types, lane = 4 g + c; a "slot" is one group of 4 of the
instruction's 32-wide reduction):
  A  a0, a2 = the pairs in slots c and c + 4 of row g; a1, a3 = the same of row g + 8
  B  b_i = inputs (2c + 8i, 2c + 8i + 1) of the reduction for token g (one int32)
  E  lanes with c in {0, 1} (selector 0): the codes of slots 4c .. 4c + 3, row g in the low half, row g + 8 high
  D  d0, d1 = tokens 2c, 2c + 1 of row g; d2, d3 = the same of row g + 8
The reduction's order is free as long as A, B and E agree: the kernel takes 64-wide blocks (16 groups) as two
instructions and gives lane c's four consecutive pairs (groups 4c .. 4c + 3, one 16-byte run of a row, two 8-byte
loads) to slots c and c + 4 of both, so the values load in runs; the codes and inputs follow that assignment.
Written in Gluon (Triton's language with explicit layouts) so that each thread's elements are exactly its fragment:
every operand is a (warps, 32) tensor with one element per thread; the warps split the reduction and are summed at
the end. The instruction is inline PTX, which Triton's interpreter cannot run: the kernel is checked against the
float64 product under ``-m gpu`` (``tests/test_inference.py``) and compiled for sm_90 on CPU machines
(``tests/test_decode_compile.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@triton.jit
def _input_fragments(X, XF, N, SB, s_xn):
    """The inputs in the order the sparse kernel's lanes take them (its PREP form): for token block t (8 tokens) and
    64-wide block sb, XF[(t SB + sb) 256 + 128 m + 4 lane + i] = register b_i of mma m for that lane, the int32
    pair 2G + (c odd) of token 8t + g (``_inputs``), zero past the last token. Each lane then loads its four B
    registers of an mma as one 16-byte run, a warp 512 contiguous bytes, instead of four 4-byte loads across eight
    token rows. Plain Triton (runs in the interpreter). Grid: (SB, token blocks)."""
    sb = tl.program_id(0)
    t = tl.program_id(1)
    e = tl.arange(0, 256)
    m = e // 128
    lane = (e // 4) % 32
    i = e % 4
    c = lane % 4
    tok = t * 8 + lane // 4
    pair = sb * 32 + 8 * (c // 2) + 4 * m + (i % 2) * 16 + (i // 2) * 2 + c % 2
    X32 = X.to(tl.pointer_type(tl.int32))
    v = tl.load(X32 + tok.to(tl.int64) * (s_xn // 2) + pair, mask=tok < N, other=0)
    tl.store(XF.to(tl.pointer_type(tl.int32)) + (t * SB + sb) * 256 + e, v)


@gluon.jit
def _mma_sp(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e, FP16: gl.constexpr):
    """D = A B + C for one lane's fragments (module docstring), fp32 accumulators; selector 0."""
    if FP16:
        op: gl.constexpr = "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32"
    else:
        op: gl.constexpr = "mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32"
    return gl.inline_asm_elementwise(
        op + " {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9, $10, $11}, {$12, $13, $14, $15}, $16, 0x0;",
        "=f,=f,=f,=f,r,r,r,r,r,r,r,r,f,f,f,f,r", [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _pairs(ptr, ok, pair: gl.constexpr):
    """Two consecutive int32 per lane (one 8-byte load), split."""
    two = gl.expand_dims(gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(0, pair))), 0), 0)
    return gl.split(gl.load(ptr[:, :, None] + two, mask=ok[:, :, None], other=0))


@gluon.jit
def _quad(ptr, ok, layout: gl.constexpr, quad: gl.constexpr):
    """Four consecutive int32 per lane (one 16-byte load), split into four (warps, 32) tensors of ``layout``."""
    base: gl.constexpr = gl.SliceLayout(2, quad)
    four = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, quad))), 0), 0)
    v = gl.load(gl.convert_layout(ptr, base)[:, :, None] + four, mask=gl.convert_layout(ok, base)[:, :, None], other=0)
    even, odd = gl.split(gl.reshape(v, [v.shape[0], 32, 2, 2]))  # (offsets 0, 2 and 1, 3)
    w0, w2 = gl.split(even)
    w1, w3 = gl.split(odd)
    return (gl.convert_layout(w0, layout), gl.convert_layout(w1, layout), gl.convert_layout(w2, layout),
            gl.convert_layout(w3, layout))


@gluon.jit
def _codes(lo, hi, j):
    """The 16-bit metadata of one row for slots 4c .. 4c + 3: nibbles j, j + 4, j + 8, j + 12 of the row's 16 codes
    (lo: groups 0-7, hi: 8-15)."""
    return (((lo >> (4 * j)) & 0xF) | ((lo >> (12 + 4 * j)) & 0xF0) | (((hi << 8) >> (4 * j)) & 0xF00)
            | ((hi >> (4 + 4 * j)) & 0xF000))


@gluon.jit
def _inputs(X32, tok, N, base, ok, s_x32, m: gl.constexpr):
    """B fragment of mma ``m`` (0, 1) of a 64-wide block for tokens ``tok``: int32 2G + (c odd) of each token's row for
    groups G = 4h + 2m, 8 + 4h + 2m, 4h + 2m + 1, 8 + 4h + 2m + 1 (h = c // 2; ``base`` = block * 32 + c % 2 + 8h)."""
    ok = ok & (tok < N)
    row = X32 + tok.to(gl.int64) * s_x32 + base + 4 * m
    return (gl.load(row, mask=ok, other=0), gl.load(row + 16, mask=ok, other=0),
            gl.load(row + 2, mask=ok, other=0), gl.load(row + 18, mask=ok, other=0))


@gluon.jit
def _fragments(v_lo, v_hi, p_lo, p_hi, X32, tok, N, sb, sb_end, s_x32, xbase, j, XF, xf, xf2, TWO: gl.constexpr,
               PREP: gl.constexpr, pair: gl.constexpr, quad: gl.constexpr):
    """64-wide block ``sb``'s registers of one lane for its two mma: A of rows g, g + 8 (groups 4c .. 4c + 3, one
    16-byte load a row), E, B of tokens ``tok`` and (TWO) ``tok + 8``: with PREP from ``XF`` (the inputs in fragment
    order, ``_input_fragments``: one 16-byte load per mma; ``xf``, ``xf2`` this lane's offsets there for the two
    token blocks), else gathered from the inputs' rows; zeros past ``sb_end`` (codes 0x4444 there: positions 0 and 1,
    a valid pair)."""
    layout: gl.constexpr = gl.SliceLayout(2, pair)
    ok = sb < sb_end
    g = _quad(v_lo + sb * 16, ok, layout, quad)
    h = _quad(v_hi + sb * 16, ok, layout, quad)
    lo0, hi0 = _pairs(p_lo + sb * 2, ok, pair)
    lo8, hi8 = _pairs(p_hi + sb * 2, ok, pair)
    lo0 = gl.where(ok, lo0, 0x44444444)
    hi0 = gl.where(ok, hi0, 0x44444444)
    lo8 = gl.where(ok, lo8, 0x44444444)
    hi8 = gl.where(ok, hi8, 0x44444444)
    e0 = _codes(lo0, hi0, j) | (_codes(lo8, hi8, j) << 16)
    e1 = _codes(lo0, hi0, j + 2) | (_codes(lo8, hi8, j + 2) << 16)
    if PREP:  # (block sb of token block t: 2 x 128 int32 at (t SB + sb) 256, lane-major, four a lane)
        b0 = _quad(XF + xf + sb * 256, ok, layout, quad)
        b1 = _quad(XF + xf + sb * 256 + 128, ok, layout, quad)
        if TWO:
            c0 = _quad(XF + xf2 + sb * 256, ok, layout, quad)
            c1 = _quad(XF + xf2 + sb * 256 + 128, ok, layout, quad)
        else:
            c0 = b0
            c1 = b1
    else:
        base = sb * 32 + xbase
        b0 = _inputs(X32, tok, N, base, ok, s_x32, 0)
        b1 = _inputs(X32, tok, N, base, ok, s_x32, 1)
        if TWO:
            c0 = _inputs(X32, tok + 8, N, base, ok, s_x32, 0)
            c1 = _inputs(X32, tok + 8, N, base, ok, s_x32, 1)
        else:
            c0 = b0
            c1 = b1
    return (g[0], h[0], g[1], h[1]), (g[2], h[2], g[3], h[3]), e0, e1, b0, b1, c0, c1


@gluon.jit
def _step(fr, d, f, TWO: gl.constexpr, FP16: gl.constexpr):
    """One 64-wide block (two mma): d += its product for the first n8 tile, f for the second (TWO)."""
    a0, a1, e0, e1, b0, b1, c0, c1 = fr
    d = _mma_sp(a0[0], a0[1], a0[2], a0[3], b0[0], b0[1], b0[2], b0[3], d[0], d[1], d[2], d[3], e0, FP16)
    d = _mma_sp(a1[0], a1[1], a1[2], a1[3], b1[0], b1[1], b1[2], b1[3], d[0], d[1], d[2], d[3], e1, FP16)
    if TWO:
        f = _mma_sp(a0[0], a0[1], a0[2], a0[3], c0[0], c0[1], c0[2], c0[3], f[0], f[1], f[2], f[3], e0, FP16)
        f = _mma_sp(a1[0], a1[1], a1[2], a1[3], c1[0], c1[1], c1[2], c1[3], f[0], f[1], f[2], f[3], e1, FP16)
    return d, f


@gluon.jit
def _nm24_mma_sp(X, V, P, Y, XF, N, M, SB, SB_SPLIT, s_xn, s_vm, s_pm, s_yn,
                 WARPS: gl.constexpr, TWO: gl.constexpr, DEPTH: gl.constexpr, PREP: gl.constexpr,
                 FP16: gl.constexpr):
    """Y (N, M) = X (N, 64 SB) @ W^T, W 2:4 of 16-bit values (V: row r's pair of group q at V[r, 2q:2q+2]; P: codes,
    two groups a byte). Program (row tile of 16, token block of 8, or 16 with TWO: a second n8 tile); warp w
    reduces 64-wide blocks [w SB_SPLIT, (w + 1) SB_SPLIT), DEPTH (2 or 4) at a time, the next DEPTH loaded before
    these are multiplied. A block is two mma: lane c's four pairs (groups 4c .. 4c + 3, one 16-byte
    run of a row) are groups 4c + 2m and 4c + 2m + 1 of mma m, i.e. its k slots c and c + 4 hold those groups; the
    codes and inputs follow the same assignment. Rows past M wrap (valid addresses, dropped at the store). X rows
    and V, P rows 8-byte aligned (the launcher checks)."""
    pair: gl.constexpr = gl.BlockedLayout([1, 1, 2], [1, 32, 1], [WARPS, 1, 1], [2, 1, 0])
    quad: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32, 1], [WARPS, 1, 1], [2, 1, 0])
    layout: gl.constexpr = gl.SliceLayout(2, pair)
    pid_m = gl.program_id(0)
    tok = gl.program_id(1) * (16 if TWO else 8)
    warp = gl.arange(0, WARPS, layout=gl.SliceLayout(1, layout))[:, None]
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, layout))[None, :]
    g = lane // 4
    c = lane % 4
    row_lo = pid_m * 16 + g
    r_lo = (row_lo % M).to(gl.int64)
    r_hi = ((row_lo + 8) % M).to(gl.int64)
    V32 = V.to(gl.pointer_type(gl.int32))
    P32 = P.to(gl.pointer_type(gl.int32))
    X32 = X.to(gl.pointer_type(gl.int32))
    s_x32 = s_xn // 2
    v_lo = V32 + r_lo * (s_vm // 2) + 4 * c
    v_hi = V32 + r_hi * (s_vm // 2) + 4 * c
    p_lo = P32 + r_lo * (s_pm // 4)
    p_hi = P32 + r_hi * (s_pm // 4)
    j = c % 2  # (lanes 2, 3 form what lanes 0, 1 do: selector 0 reads lanes 0 and 1)
    xbase = c % 2 + 8 * (c // 2)
    zero = gl.zeros([WARPS, 32], gl.float32, layout)
    d = (zero, zero, zero, zero)
    f = (zero, zero, zero, zero)
    sb0 = warp * SB_SPLIT
    sb_end = gl.minimum(sb0 + SB_SPLIT, SB)
    tk = tok + g
    XF32 = XF.to(gl.pointer_type(gl.int32))
    xf = (tok // 8) * SB * 256 + lane * 4
    xf2 = xf + SB * 256
    f0 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
    f1 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + 1, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
    if DEPTH == 2:
        for i in range(2, SB_SPLIT + 2, 2):
            n0 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + i, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
            n1 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + i + 1, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
            d, f = _step(f0, d, f, TWO, FP16)
            d, f = _step(f1, d, f, TWO, FP16)
            f0, f1 = n0, n1
    else:  # (four blocks in flight)
        f2 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + 2, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
        f3 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + 3, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
        for i in range(4, SB_SPLIT + 4, 4):
            n0 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + i, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
            n1 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + i + 1, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
            n2 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + i + 2, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
            n3 = _fragments(v_lo, v_hi, p_lo, p_hi, X32, tk, N, sb0 + i + 3, sb_end, s_x32, xbase, j, XF32, xf, xf2, TWO, PREP, pair, quad)
            d, f = _step(f0, d, f, TWO, FP16)
            d, f = _step(f1, d, f, TWO, FP16)
            d, f = _step(f2, d, f, TWO, FP16)
            d, f = _step(f3, d, f, TWO, FP16)
            f0, f1, f2, f3 = n0, n1, n2, n3
    rows = pid_m * 16 + gl.arange(0, 32, layout=gl.SliceLayout(0, layout)) // 4
    _store(Y, gl.sum(d[0], axis=0), gl.sum(d[1], axis=0), gl.sum(d[2], axis=0), gl.sum(d[3], axis=0), tok, rows,
           N, M, s_yn, layout)
    if TWO:
        _store(Y, gl.sum(f[0], axis=0), gl.sum(f[1], axis=0), gl.sum(f[2], axis=0), gl.sum(f[3], axis=0), tok + 8,
               rows, N, M, s_yn, layout)


@gluon.jit
def _store_one(Y, val, t, r, N, M, s_yn):
    gl.store(Y + t.to(gl.int64) * s_yn + r, val.to(Y.dtype.element_ty), mask=(t < N) & (r < M))


@gluon.jit
def _store(Y, d0, d1, d2, d3, tok0, row, N, M, s_yn, layout: gl.constexpr):
    """The D fragment of one n8 tile (tokens tok0 ..): rows ``row`` and ``row + 8``, tokens 2c and 2c + 1."""
    t = tok0 + 2 * (gl.arange(0, 32, layout=gl.SliceLayout(0, layout)) % 4)
    _store_one(Y, d0, t, row, N, M, s_yn)
    _store_one(Y, d1, t + 1, row, N, M, s_yn)
    _store_one(Y, d2, t, row + 8, N, M, s_yn)
    _store_one(Y, d3, t + 1, row + 8, N, M, s_yn)
