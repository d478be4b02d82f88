"""Does a backward pass cost more host time on autograd's device thread than on the calling thread? (device machine)

Wall microseconds per call at 16 tokens (host-bound), with autograd's multithreading on (the default: CUDA backward
runs on a per-device worker thread) and off (backward on the calling thread), for a few autograd Functions whose
backward does known work, dense F.linear, and the Monarch / block-diagonal layers on the "triton" backend.
Run 6 (H200 host, benchmarks/results/logs/backward-thread-run6.log): a trivial Python backward node costs ~46 us more
on the worker thread (87 vs 41 us per step), 30 view ops cost about the same on either (~120 us), and the Monarch
layer's step took 811 vs 518 us.

    python benchmarks/experiments/backward_thread.py
"""

import torch
from _common import wall_us

import structmat.kernels as K
from structmat.structures.blockdiag import BlockDiagonal
from structmat.structures.monarch import Monarch


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class ThirtyViews(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        for _ in range(10):
            g = g.view(g.shape).transpose(0, 1).transpose(0, 1)
        return g


class FourBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        for _ in range(4):
            torch.bmm(w, w)
        return g, None


def main():
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(16, 4096, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(16, 4096, device=dev, dtype=dt)
    w = torch.randn(4, 64, 64, device=dev, dtype=dt)
    wd = torch.randn(4096, 4096, device=dev, dtype=dt, requires_grad=True)
    mon = Monarch(4096, 4096, nblocks=4, bias=False).to(dev, dt)
    bd = BlockDiagonal(4096, 4096, nblocks=4, bias=False).to(dev, dt)
    cases = {"identity": (lambda: Identity.apply(x), [x]),
             "30 views": (lambda: ThirtyViews.apply(x), [x]),
             "4 bmm": (lambda: FourBmm.apply(x, w), [x]),
             "dense": (lambda: torch.nn.functional.linear(x, wd), [x, wd]),
             "monarch triton": (lambda: mon._matmul(x), [x, *mon.parameters()]),
             "blockdiag triton": (lambda: bd._matmul(x), [x, *bd.parameters()])}
    K.set_backend("triton")
    for threaded in (True, False):
        with torch.autograd.set_multithreading_enabled(threaded):
            for name, (fwd, inputs) in cases.items():
                step = wall_us(lambda: torch.autograd.grad(fwd(), inputs, g))
                print(f"multithreading={threaded!s:5} {name:16s} fwd {wall_us(fwd):7.1f} us  fwd+bwd {step:7.1f} us")


if __name__ == "__main__":
    main()
