"""Which engine per GEMM role gives the fastest layer call, host cost included? (device machine)

For a few IMPL mixes (ops.IMPL: which roles run on the Triton kernel, the rest on cuBLAS), times the Monarch and
block-diagonal 4096x4096 nblocks=4 layers (forced backend "triton", bf16) forward and forward+backward at 16 tokens
(host-bound: wall clock per call) and at 8192 tokens (triton.testing.do_bench median, as the kernel benchmark).

    python benchmarks/experiments/impl_variants.py
"""

import torch
import triton.testing
from _common import wall_us

import structmat.kernels as K
from structmat.kernels import ops
from structmat.structures.blockdiag import BlockDiagonal
from structmat.structures.monarch import Monarch

MIXES = {
    "shipped": {},
    "all cublas": {r: "cublas" for r in ops.IMPL},
    "all triton": {r: "triton" for r in ops.IMPL},
    "triton s1+dh": {"mon_s1": "triton", "mon_dh": "triton"},
    "triton permuted+bwd": {"mon_s1": "triton", "mon_dh": "triton", "mon_dx": "triton", "mon_dr": "triton",
                            "mon_dl": "triton", "bd_dx": "triton", "bd_dw": "triton"},
}


def main():
    dev, dt = "cuda", torch.bfloat16
    shipped = dict(ops.IMPL)
    layers = {"monarch": Monarch(4096, 4096, nblocks=4, bias=False).to(dev, dt),
              "blockdiag": BlockDiagonal(4096, 4096, nblocks=4, bias=False).to(dev, dt)}
    data = {n: (torch.randn(n, 4096, device=dev, dtype=dt, requires_grad=True),
                torch.randn(n, 4096, device=dev, dtype=dt)) for n in (16, 8192)}
    K.set_backend("triton")
    for mix, roles in MIXES.items():
        ops.IMPL.clear()
        ops.IMPL.update(shipped, **roles)
        for name, layer in layers.items():
            params = list(layer.parameters())
            out = []
            for n, (x, g) in data.items():
                def fwd():
                    with torch.no_grad():
                        return layer._matmul(x)

                def step():
                    return torch.autograd.grad(layer._matmul(x), [x, *params], g)

                if n == 16:
                    out.append(f"n=16 fwd {wall_us(fwd):6.1f} us fwd+bwd {wall_us(step):6.1f} us")
                else:
                    f = triton.testing.do_bench(fwd, warmup=5, rep=30, return_mode="median")
                    s = triton.testing.do_bench(step, warmup=5, rep=30, return_mode="median")
                    out.append(f"n=8192 fwd {f:.3f} ms fwd+bwd {s:.3f} ms")
            print(f"{mix:20s} {name:9s} " + " | ".join(out), flush=True)
    dense = torch.randn(4096, 4096, device=dev, dtype=dt, requires_grad=True)
    x, g = data[8192]
    print("dense n=8192 fwd+bwd %.3f ms" % triton.testing.do_bench(
        lambda: torch.autograd.grad(torch.nn.functional.linear(x, dense), [x, dense], g), warmup=5, rep=30,
        return_mode="median"))


if __name__ == "__main__":
    main()
