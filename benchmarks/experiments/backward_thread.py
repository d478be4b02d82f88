"""Is the host cost of a backward pass higher on autograd's device thread? (run 6: yes, ~2x per op)

    python benchmarks/experiments/backward_thread.py
"""
import os
import time, torch, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import structmat.kernels as K
from structmat.structures.monarch import Monarch
from structmat.structures.blockdiag import BlockDiagonal
dev="cuda"; dt=torch.bfloat16
def wall(fn,n=300):
    for _ in range(30): fn()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter()-t)/n*1e6
class Ident(torch.autograd.Function):
    @staticmethod
    def forward(ctx,x): return x.view_as(x)
    @staticmethod
    def backward(ctx,g): return g
class Views(torch.autograd.Function):
    @staticmethod
    def forward(ctx,x): return x.view_as(x)
    @staticmethod
    def backward(ctx,g):
        for _ in range(10): g = g.view(g.shape).transpose(0,1).transpose(0,1)
        return g
class Bmms(torch.autograd.Function):
    @staticmethod
    def forward(ctx,x,w): ctx.save_for_backward(w); return x.clone()
    @staticmethod
    def backward(ctx,g):
        w,=ctx.saved_tensors
        for _ in range(4): torch.bmm(w,w)
        return g, None
x=torch.randn(16,4096,device=dev,dtype=dt,requires_grad=True); g=torch.randn(16,4096,device=dev,dtype=dt)
w=torch.randn(4,64,64,device=dev,dtype=dt)
m=Monarch(4096,4096,nblocks=4,bias=False).to(dev,dt); b=BlockDiagonal(4096,4096,nblocks=4,bias=False).to(dev,dt)
Wd=torch.randn(4096,4096,device=dev,dtype=dt,requires_grad=True)
cases={"ident":(lambda: Ident.apply(x),[x]),"views x10":(lambda: Views.apply(x),[x]),"4 bmm":(lambda: Bmms.apply(x,w),[x]),
 "dense":(lambda: torch.nn.functional.linear(x,Wd),[x,Wd]),
 "monarch triton":(lambda: m._matmul(x),[x,*m.parameters()]),"blockdiag":(lambda: b._matmul(x),[x,*b.parameters()])}
for mt in (True, False):
    with torch.autograd.set_multithreading_enabled(mt):
        for name,(f,ins) in cases.items():
            with K.use_backend("triton"):
                print(f"multithreading={mt!s:5} {name:16s} fwd {wall(f):7.1f} us  fwd+bwd {wall(lambda: torch.autograd.grad(f(),ins,g)):7.1f} us")
