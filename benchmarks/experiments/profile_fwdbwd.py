"""Where the host time of one few-token forward+backward goes (device machine): wall time per phase and the
torch.profiler table of one call, for the Monarch and block-diagonal layers on each backend and for dense.

    python benchmarks/experiments/profile_fwdbwd.py [tokens]
"""

import sys

import torch
import torch.nn.functional as F
from _common import wall_us

import structmat.kernels as K
from structmat.structures.blockdiag import BlockDiagonal
from structmat.structures.monarch import Monarch


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(n, 4096, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(n, 4096, device=dev, dtype=dt)
    Wd = torch.randn(4096, 4096, device=dev, dtype=dt, requires_grad=True)
    cases = {"dense": (lambda: F.linear(x, Wd), [x, Wd])}
    for name, layer in [("monarch", Monarch(4096, 4096, nblocks=4, bias=False)),
                        ("blockdiag", BlockDiagonal(4096, 4096, nblocks=4, bias=False))]:
        layer = layer.to(device=dev, dtype=dt)
        for be in ("triton", "cublas", "reference"):
            cases[f"{name}/{be}"] = (lambda layer=layer, be=be: _with(be, layer, x), [x, *layer.parameters()])
    for label, (fwd, inputs) in cases.items():
        y = fwd()
        fwd_us = wall_us(fwd, 200)
        fb_us = wall_us(lambda: torch.autograd.grad(fwd(), inputs, g), 200)
        x_only = wall_us(lambda: torch.autograd.grad(fwd(), [x], g), 200)
        print(f"{label:22s} fwd(grad on) {fwd_us:7.1f} us   fwd+bwd {fb_us:7.1f} us   "
              f"fwd+bwd(dx only) {x_only:7.1f} us")
        del y
    for label in ("monarch/triton", "monarch/reference", "dense"):
        fwd, inputs = cases[label]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                torch.autograd.grad(fwd(), inputs, g)
            torch.cuda.synchronize()
        print(f"\n=== {label}: 10 calls ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))


def _with(be, layer, x):
    with K.use_backend(be):
        return layer._matmul(x)


if __name__ == "__main__":
    main()
