"""The generalized delta rule: one functional op, two pure-PyTorch backends, one numerics contract.

Per batch element and head the state is a matrix ``S`` of shape ``(Dk, Dv)``. Token ``t`` carries a scalar gate
``g_t = exp(log_gate_t)`` (1 when there is no gate) and ``n_h >= 1`` Householder-like factors
``(k_{t,j}, v_{t,j}, beta_{t,j})``; the recurrence is

    S <- g_t * S                                              (once per token)
    S <- (I - beta_{t,j} k_{t,j} k_{t,j}^T) S + beta_{t,j} k_{t,j} v_{t,j}^T      for j = 1 .. n_h, in order
    o_t = S^T q_t                                             (after the last sub-step)

so ``S_t = g_t * prod_j (I - beta_{t,j} k k^T) S_{t-1} + (the writes)``. With L2-normalized keys each factor has
eigenvalues ``1`` (multiplicity ``Dk-1``) and ``1 - beta``: ``beta in [0, 1]`` gives the range ``[0, 1]`` (DeltaNet),
``beta in [0, 2]`` gives ``[-1, 1]`` (the state-tracking range). ``n_h = 1`` is DeltaNet / Gated DeltaNet, ``n_h > 1``
is DeltaProduct. The op does not normalize keys or squash ``beta``: :func:`l2norm` and :func:`beta_from_logits` do
that for callers (the layers in :mod:`structmat.mixers.layers` use them).

Backends (chosen by the caller, never switched silently; an unknown name is a ``ValueError``):

``"recurrent"``  the token-by-token loop above: the specification. Computes in float64 for float64 inputs and in
                 float32 otherwise (bf16/fp16 inputs are upcast, outputs cast back).
``"chunked"``    the chunkwise-parallel WY/UT form, pure PyTorch, CPU and GPU, ``torch.compile(fullgraph=True)``-able
                 (fixed-length path). Within a chunk of ``C`` steps (cumulative log gate ``gamma``), the
                 "new values" ``U`` solve the unit lower-triangular system ``(I + A) U = diag(beta) V -
                 diag(beta e^gamma) K S_0`` with ``A_rs = beta_r e^{gamma_r - gamma_s} k_r.k_s`` (s < r), i.e. the UT
                 transform ``T = (I + A)^-1`` applied once to ``[beta V | beta e^gamma K]`` (``U~`` and the WY factor
                 ``W``). Then ``S_C = (e^{gamma_C} I - K~^T W) S_0 + K~^T U~`` with ``K~ = e^{gamma_C - gamma} K``, and
                 ``O = (e^gamma Q - P W) S_0 + P U~`` with ``P = (Q K^T) * e^{gamma_r - gamma_s} [s <= r]``. Only the
                 affine map between chunk states is sequential (one batched matmul per chunk, a custom autograd
                 function with a reverse loop); all else is batched over chunks. Internals run in float32 (float64 for
                 float64 inputs); every exponent is ``<= 0``, so nothing overflows.
``"fla"``        flash-linear-attention's Triton kernels (CUDA, bf16/fp16; the ``[gpu]`` extra), arguments mapped exactly
                 (:mod:`structmat.mixers.fla_backend`); inputs it cannot take are a ``ValueError`` saying why.
``"auto"``       ``"fla"`` where it can run the inputs (and, when gradients are needed, their backward), else
                 ``"chunked"``; the decision and its reason are logged once (logger ``structmat.mixers``).

Padding and variable length. ``mask`` (B, T), true/1 for real tokens: a padded token is an identity step (no gate,
no write) and its output is 0; left or right padding both work. ``cu_seqlens`` (N+1,) int, with batch size 1: the
``N`` packed sequences are independent (state reset at each boundary; ``initial_state`` then has ``N`` rows and the
final state has ``N`` rows). Precedence: ``cu_seqlens`` defines the sequences, so ``mask`` must be ``None`` when
``cu_seqlens`` is given (a ``ValueError`` otherwise: the two are never silently combined or one dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fla_backend import delta_rule_fla, fla_unsupported, resolve_backend

BACKENDS = ("recurrent", "chunked", "fla", "auto")

__all__ = ["delta_rule", "delta_rule_recurrent", "delta_rule_chunked", "l2norm", "beta_from_logits", "BACKENDS"]


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """L2-normalize the last dimension (in float32 for low-precision inputs)."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def beta_from_logits(logits: Tensor, allow_neg_eigval: bool) -> Tensor:
    """``sigmoid(logits)`` in (0, 1) (eigenvalues in [0, 1]) or ``2 sigmoid`` in (0, 2) (eigenvalues in [-1, 1])."""
    b = torch.sigmoid(logits)
    return 2.0 * b if allow_neg_eigval else b


# ----------------------------------------------------------------------------------------------------------------
# argument checking and layout


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(q, k, v, beta, log_gate, initial_state, mask, cu_seqlens):
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, Dk), got shape {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    if k.dim() == 4:
        k, v = k.unsqueeze(3), v.unsqueeze(3)
        beta = beta.unsqueeze(3)
    if k.dim() != 5 or k.shape[:3] != (B, T, H) or k.shape[4] != Dk:
        raise ValueError(f"k must be (B, T, H, Dk) or (B, T, H, n_h, Dk) matching q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    nh = k.shape[3]
    if v.dim() != 5 or v.shape[:4] != (B, T, H, nh):
        raise ValueError(f"v must be (B, T, H[, n_h], Dv) matching k, got {tuple(v.shape)}")
    if beta.shape != (B, T, H, nh):
        raise ValueError(f"beta must be (B, T, H[, n_h]) = {(B, T, H, nh)}, got {tuple(beta.shape)}")
    if log_gate is not None and log_gate.shape != (B, T, H):
        raise ValueError(f"log_gate must be (B, T, H) = {(B, T, H)}, got {tuple(log_gate.shape)}")
    Dv = v.shape[-1]
    if mask is not None and cu_seqlens is not None:
        raise ValueError("pass either cu_seqlens (packed variable-length sequences) or mask (padding), not both: "
                         "cu_seqlens defines the sequences, so a padding mask has no meaning beside it")
    if mask is not None and mask.shape != (B, T):
        raise ValueError(f"mask must be (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    nseq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [0, l1, l1+l2, ..., T]")
        nseq = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (nseq, H, Dk, Dv):
        raise ValueError(f"initial_state must be {(nseq, H, Dk, Dv)} (one row per sequence), "
                         f"got {tuple(initial_state.shape)}")
    return k, v, beta, nh, Dv


# ----------------------------------------------------------------------------------------------------------------
# (a) the recurrent reference: the specification


def _recurrent_one(q, k, v, beta, lg, S):
    """q (B,T,H,Dk), k (B,T,H,nh,Dk), v (B,T,H,nh,Dv), beta (B,T,H,nh), lg (B,T,H) or None, S (B,H,Dk,Dv)."""
    outs = []
    for t in range(q.shape[1]):
        if lg is not None:
            S = S * torch.exp(lg[:, t])[..., None, None]
        for j in range(k.shape[3]):
            kt, vt, bt = k[:, t, :, j], v[:, t, :, j], beta[:, t, :, j]
            pred = torch.einsum("bhkv,bhk->bhv", S, kt)
            S = S + torch.einsum("bhk,bhv->bhkv", bt[..., None] * kt, vt - pred)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1), S


def delta_rule_recurrent(q, k, v, beta, log_gate=None, initial_state=None, output_final_state=False,
                         mask=None, cu_seqlens=None):
    """The specification: a plain loop over tokens (and sub-steps). See the module docstring for the contract."""
    k, v, beta, nh, Dv = _check(q, k, v, beta, log_gate, initial_state, mask, cu_seqlens)
    B, T, H, Dk = q.shape
    cd, od = _compute_dtype(q.dtype), q.dtype
    q, k, v, beta = q.to(cd), k.to(cd), v.to(cd), beta.to(cd)
    lg = None if log_gate is None else log_gate.to(cd)
    if mask is not None:
        m = mask.to(cd)
        beta = beta * m[:, :, None, None]
        lg = None if lg is None else lg * m[:, :, None]
    if cu_seqlens is None:
        S0 = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(cd)
        o, S = _recurrent_one(q, k, v, beta, lg, S0)
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        os_, Ss = [], []
        for i in range(len(bounds) - 1):
            a, b = bounds[i], bounds[i + 1]
            S0 = q.new_zeros(1, H, Dk, Dv) if initial_state is None else initial_state[i:i + 1].to(cd)
            oi, Si = _recurrent_one(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b],
                                    None if lg is None else lg[:, a:b], S0)
            os_.append(oi)
            Ss.append(Si)
        o, S = torch.cat(os_, 1), torch.cat(Ss, 0)
    if mask is not None:
        o = o * mask.to(cd)[:, :, None, None]
    return o.to(od), (S if output_final_state else None)


# ----------------------------------------------------------------------------------------------------------------
# (b) the chunkwise-parallel WY/UT form


class _ChunkStateScan(torch.autograd.Function):
    """states[:, 0] = S0; states[:, n+1] = A[:, n] @ states[:, n] + B[:, n]. A (N, nc, Dk, Dk), B (N, nc, Dk, Dv)."""

    @staticmethod
    def forward(ctx, A, Bm, S0):
        S = S0
        out = [S0]
        for n in range(A.shape[1]):
            S = torch.baddbmm(Bm[:, n], A[:, n], S)
            out.append(S)
        states = torch.stack(out, 1)
        ctx.save_for_backward(A, states)
        return states

    @staticmethod
    def backward(ctx, gstates):
        A, states = ctx.saved_tensors
        nc = A.shape[1]
        dS = gstates[:, nc]
        dB = []
        for n in range(nc - 1, -1, -1):
            dB.append(dS)
            dS = torch.baddbmm(gstates[:, n], A[:, n].transpose(-1, -2), dS)
        dBm = torch.stack(dB[::-1], 1)  # dL/dB_n = dL/dS_{n+1}
        dA = dBm @ states[:, :-1].transpose(-1, -2)
        return dA, dBm, dS


def _chunked_core(q, k, v, beta, lg, S0, C):
    """All (N, L, .) in the compute dtype with L % C == 0; lg (N, L) (zeros when ungated); S0 (N, Dk, Dv)."""
    N, L, Dk = k.shape
    Dv = v.shape[-1]
    nc = L // C
    q, k, v = q.view(N, nc, C, Dk), k.view(N, nc, C, Dk), v.view(N, nc, C, Dv)
    beta, gam = beta.view(N, nc, C), lg.view(N, nc, C).cumsum(-1)
    idx = torch.arange(C, device=q.device)
    incl = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    decay = torch.exp((gam[..., :, None] - gam[..., None, :]).masked_fill(~incl, float("-inf")))  # <= 1
    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    eye_c = torch.eye(C, dtype=q.dtype, device=q.device)
    eg = torch.exp(gam)
    rhs = torch.cat([beta[..., None] * v, (beta * eg)[..., None] * k], -1)
    sol = torch.linalg.solve_triangular(A + eye_c, rhs, upper=False, unitriangular=True)
    Ut, W = sol[..., :Dv], sol[..., Dv:]
    P = (q @ k.transpose(-1, -2)) * decay
    Kt = torch.exp(gam[..., -1:] - gam)[..., None] * k
    KtT = Kt.transpose(-1, -2)
    eye_k = torch.eye(Dk, dtype=q.dtype, device=q.device)
    Am = eg[..., -1, None, None] * eye_k - KtT @ W  # (N, nc, Dk, Dk)
    Bm = KtT @ Ut  # (N, nc, Dk, Dv)
    states = _ChunkStateScan.apply(Am, Bm, S0)
    Qh = eg[..., None] * q - P @ W
    o = Qh @ states[:, :-1] + P @ Ut
    return o.reshape(N, L, Dv), states[:, -1]


def _to_steps(q, k, v, beta, lg, nh):
    """(B,T,H,...) with n_h sub-steps -> (B*H, T*n_h, ...) step sequences; q sits on the last sub-step of a token,
    the gate on the first."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    ks = k.permute(0, 2, 1, 3, 4).reshape(B * H, T * nh, Dk)
    vs = v.permute(0, 2, 1, 3, 4).reshape(B * H, T * nh, Dv)
    bs = beta.permute(0, 2, 1, 3).reshape(B * H, T * nh)
    qp = q.permute(0, 2, 1, 3)
    if nh > 1:
        qp = torch.cat([qp.new_zeros(B, H, T, nh - 1, Dk), qp.unsqueeze(3)], 3)
    qs = qp.reshape(B * H, T * nh, Dk)
    if lg is None:
        gs = qs.new_zeros(B * H, T * nh)
    else:
        gp = lg.permute(0, 2, 1)
        if nh > 1:
            gp = torch.cat([gp.unsqueeze(-1), gp.new_zeros(B, H, T, nh - 1)], -1)
        gs = gp.reshape(B * H, T * nh)
    return qs, ks, vs, bs, gs


def _chunked_padded(q, k, v, beta, lg, S0, nh, chunk_size):
    """Fixed-length batch (mask already folded into beta/lg). Returns o (B,T,H,Dv), S (B,H,Dk,Dv)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qs, ks, vs, bs, gs = _to_steps(q, k, v, beta, lg, nh)
    L = T * nh
    pad = (-L) % chunk_size
    if pad:  # identity steps at the end: beta = 0, gate = 1, q = 0; they change neither the state nor any output
        qs, ks, vs = F.pad(qs, (0, 0, 0, pad)), F.pad(ks, (0, 0, 0, pad)), F.pad(vs, (0, 0, 0, pad))
        bs, gs = F.pad(bs, (0, pad)), F.pad(gs, (0, pad))
    o, S = _chunked_core(qs, ks, vs, bs, gs, S0.reshape(B * H, Dk, Dv), chunk_size)
    o = o[:, :L].reshape(B, H, T, nh, Dv)[:, :, :, -1].permute(0, 2, 1, 3)
    return o, S.reshape(B, H, Dk, Dv)


def delta_rule_chunked(q, k, v, beta, log_gate=None, initial_state=None, output_final_state=False,
                       mask=None, cu_seqlens=None, chunk_size: int = 64, max_seqlen: int | None = None):
    """The chunkwise-parallel WY/UT backend. ``chunk_size`` counts sub-steps (tokens x n_h). With ``cu_seqlens``
    the packed sequences are gathered into a right-padded batch (pass ``max_seqlen`` to avoid a device sync)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    k, v, beta, nh, Dv = _check(q, k, v, beta, log_gate, initial_state, mask, cu_seqlens)
    B, T, H, Dk = q.shape
    cd, od = _compute_dtype(q.dtype), q.dtype
    q, k, v, beta = q.to(cd), k.to(cd), v.to(cd), beta.to(cd)
    lg = None if log_gate is None else log_gate.to(cd)
    if cu_seqlens is None:
        if mask is not None:
            m = mask.to(cd)
            beta = beta * m[:, :, None, None]
            lg = None if lg is None else lg * m[:, :, None]
        S0 = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(cd)
        o, S = _chunked_padded(q, k, v, beta, lg, S0, nh, chunk_size)
        if mask is not None:
            o = o * mask.to(cd)[:, :, None, None]
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.long)
        lens = cu[1:] - cu[:-1]
        nseq = lens.numel()
        Tm = int(lens.max()) if max_seqlen is None else int(max_seqlen)
        pos = torch.arange(Tm, device=q.device)
        valid = pos[None, :] < lens[:, None]  # (nseq, Tm)
        gidx = (cu[:-1, None] + pos[None, :]).clamp(max=max(T - 1, 0))  # (nseq, Tm)

        def gather(x):
            return x[0][gidx]  # (nseq, Tm, ...)

        m = valid.to(cd)
        qp, kp, vp = gather(q), gather(k), gather(v)
        bp = gather(beta) * m[:, :, None, None]
        lp = None if lg is None else gather(lg) * m[:, :, None]
        S0 = q.new_zeros(nseq, H, Dk, Dv) if initial_state is None else initial_state.to(cd)
        op, S = _chunked_padded(qp, kp, vp, bp, lp, S0, nh, chunk_size)
        # scatter back to the packed layout: token t of the packed sequence is (seq, t - cu[seq])
        seq_id = torch.bucketize(torch.arange(T, device=q.device), cu[1:], right=True)
        o = op[seq_id, torch.arange(T, device=q.device) - cu[seq_id]].unsqueeze(0)
    return o.to(od), (S if output_final_state else None)


def delta_rule(q, k, v, beta, log_gate=None, initial_state=None, output_final_state=False, mask=None,
               cu_seqlens=None, backend: str = "chunked", chunk_size: int = 64, max_seqlen: int | None = None):
    """The generalized delta rule (DeltaNet / Gated DeltaNet / DeltaProduct), see the module docstring.

    Shapes: q (B, T, H, Dk); k (B, T, H, Dk) or (B, T, H, n_h, Dk); v (B, T, H, Dv) or (B, T, H, n_h, Dv);
    beta (B, T, H) or (B, T, H, n_h); log_gate (B, T, H), entries <= 0, or None (no gate); initial_state
    (B or N, H, Dk, Dv). Returns ``(o (B, T, H, Dv) in q's dtype, final_state (B or N, H, Dk, Dv) in the compute
    dtype, or None unless output_final_state)``. ``backend`` is used as named for every length (T = 1 included);
    ``"auto"`` decides from the inputs as the module docstring says.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend in ("fla", "auto"):
        k5, v5, beta5, _, _ = _check(q, k, v, beta, log_gate, initial_state, mask, cu_seqlens)
        gated = log_gate is not None
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, beta, log_gate, initial_state))
        if backend == "auto":
            backend = resolve_backend(backend, q, k5, v5, gated, needs_grad)
        else:
            why = fla_unsupported(q, k5, v5, gated, needs_grad)
            if why:
                raise ValueError(f"delta_rule(backend='fla'): {why}; use backend='auto' or 'chunked'")
        if backend == "fla":
            return delta_rule_fla(q, k5, v5, beta5, log_gate, initial_state, output_final_state, mask, cu_seqlens)
    if backend == "recurrent":
        return delta_rule_recurrent(q, k, v, beta, log_gate, initial_state, output_final_state, mask, cu_seqlens)
    return delta_rule_chunked(q, k, v, beta, log_gate, initial_state, output_final_state, mask, cu_seqlens,
                              chunk_size=chunk_size, max_seqlen=max_seqlen)
