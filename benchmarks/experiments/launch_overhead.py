"""Host cost of one launch, on the device machine: the grouped Triton kernel (through the autotuner, direct with the
tuned config, and from a second thread as autograd's backward runs it), a cuBLAS bmm, and our custom ops.
Prints microseconds per call (wall clock over 300 calls, synchronised once at the end).

    python benchmarks/experiments/launch_overhead.py
"""

import threading

import torch
from _common import wall_us

import structmat.kernels as K
from structmat.kernels import _triton_gemm as tg
from structmat.kernels import ops


def per_call_us(fn, n=300):
    try:
        return wall_us(fn, n)
    except Exception as err:  # report and go on: this is a diagnostic
        print("failed:", repr(err)[:300])
        return float("nan")


def in_thread(fn):
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("us", per_call_us(fn)))
    th.start()
    th.join()
    return out.get("us", float("nan"))


def main():
    dev, dt = "cuda", torch.bfloat16
    b, n, p, u, c = 4, 16, 1024, 1024, 256
    x = torch.randn(n, b * p, device=dev, dtype=dt)
    R = torch.randn(b, b * c, p, device=dev, dtype=dt)
    L = torch.randn(b, u, b * c, device=dev, dtype=dt)
    h = torch.empty(n, b * b * c, device=dev, dtype=dt)

    def s1():
        tg.grouped_gemm(x, (p, x.stride(0), 1), R, (R.stride(0), 1, R.stride(1)), h, (c, h.stride(0), 1), b, n,
                        b * c, p, chunk=c, chunk_stride=b * c)

    def s1_autotuner():
        tg._grouped_gemm_tuned[lambda m: (triton_cdiv(n, m["BLOCK_M"]) * triton_cdiv(b * c, m["BLOCK_N"]), b)](
            x, R, h, n, b * c, p, tg._bucket(n), p, x.stride(0), 1, R.stride(0), 1, R.stride(1), c, h.stride(0), 1,
            b * c, c, PRECISION="tf32")

    from triton import cdiv as triton_cdiv

    xb = x.view(n, b, p).transpose(0, 1)
    Rt = R[:, :c].transpose(1, 2)
    rows = {
        "triton grouped_gemm (cached config, direct)": per_call_us(s1),
        "triton grouped_gemm via autotuner": per_call_us(s1_autotuner),
        "triton grouped_gemm, second thread": in_thread(s1),
        "torch.bmm (cuBLAS)": per_call_us(lambda: torch.bmm(xb, Rt)),
        "torch.bmm, second thread": in_thread(lambda: torch.bmm(xb, Rt)),
        "torch.empty": per_call_us(lambda: torch.empty(n, 4096, device=dev, dtype=dt)),
        "custom op monarch_mm engine=triton": per_call_us(lambda: ops.monarch_mm(x, R, L, "triton")),
        "custom op monarch_mm engine=cublas": per_call_us(lambda: ops.monarch_mm(x, R, L, "cublas")),
    }
    xg, Rg, Lg = (t.detach().requires_grad_() for t in (x, R, L))
    W = torch.randn(b, u, p, device=dev, dtype=dt, requires_grad=True)
    Wd = torch.randn(b * u, b * p, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(n, b * u, device=dev, dtype=dt)
    for engine in ("triton", "cublas"):  # all gradients (x and the factors), as in training
        rows[f"monarch fwd+bwd custom op, engine={engine}"] = per_call_us(
            lambda e=engine: torch.autograd.grad(ops.monarch_mm(xg, Rg, Lg, e)[0], [xg, Rg, Lg], g))
        rows[f"monarch fwd+bwd eager Function, engine={engine}"] = per_call_us(
            lambda e=engine: torch.autograd.grad(ops.monarch(xg, Rg, Lg, e), [xg, Rg, Lg], g))
        rows[f"blockdiag fwd+bwd custom op, engine={engine}"] = per_call_us(
            lambda e=engine: torch.autograd.grad(ops.blockdiag_mm(xg, W, e), [xg, W], g))
        rows[f"blockdiag fwd+bwd eager Function, engine={engine}"] = per_call_us(
            lambda e=engine: torch.autograd.grad(ops.blockdiag(xg, W, e), [xg, W], g))
    rows["dense F.linear fwd+bwd"] = per_call_us(
        lambda: torch.autograd.grad(torch.nn.functional.linear(xg, Wd), [xg, Wd], g))
    # Through the layers (dispatch included), every forced backend, forward and forward+backward.
    from structmat.structures.blockdiag import BlockDiagonal
    from structmat.structures.monarch import Monarch

    for name, layer in [("monarch", Monarch(4096, 4096, nblocks=4, bias=False)),
                        ("blockdiag", BlockDiagonal(4096, 4096, nblocks=4, bias=False))]:
        layer = layer.to(device=dev, dtype=dt)
        params = list(layer.parameters())
        for be in ("triton", "cublas", "reference", "dense", "auto"):
            with K.use_backend(be):
                with torch.no_grad():
                    rows[f"layer {name} fwd, backend={be}"] = per_call_us(lambda: layer._matmul(x))
                if be != "dense":
                    rows[f"layer {name} fwd+bwd, backend={be}"] = per_call_us(
                        lambda: torch.autograd.grad(layer._matmul(xg), [xg, *params], g))
    for k, v in rows.items():
        print(f"{v:9.1f} us  {k}")
    print("backend", K.get_backend())


if __name__ == "__main__":
    main()
