"""structmat.fuse_siblings: q/k/v (and gate/up) as one few-token product over stacked factors.

The kernels run on CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before triton is
imported); the bookkeeping (views, dissolving, checkpoints, gradients) runs in this process on the reference path.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import nn

import structmat
from structmat.structures import build
from interpreter import interpreter_report

TOL = 1e-5  # relative RMS against float64, fp32 operands (as tests/test_inference.py)
SPECS = {"lowrank": "lowrank:rank=6", "monarch": "monarch:nblocks=4,block_rank=2", "blockdiag": "blockdiag:nblocks=4",
         "nm": "nm:n=2,m=4"}
IN, OUT = 40, 24


class Attention(nn.Module):
    """Three siblings that read one input, and a fourth layer that reads their outputs (not a sibling)."""

    def __init__(self, spec: str, dtype=torch.float32) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (build(spec, IN, OUT, dtype=dtype).init_() for _ in range(3))
        self.o_proj = build(spec, OUT, OUT, dtype=dtype).init_()

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x).sigmoid() + self.v_proj(x))


class GQA(nn.Module):
    """q twice as wide as k and v (grouped-query attention: fewer key/value heads than query heads)."""

    def __init__(self, spec: str, dtype=torch.float32) -> None:
        super().__init__()
        self.q_proj = build(spec, IN, 2 * OUT, dtype=dtype).init_()
        self.k_proj, self.v_proj = (build(spec, IN, OUT, dtype=dtype).init_() for _ in range(2))

    def forward(self, x):
        q = self.q_proj(x)
        return q[..., :OUT] * self.k_proj(x).sigmoid() + self.v_proj(x) - q[..., OUT:]


class MLP(nn.Module):
    """A gated MLP as Llama's: down(SiLU(gate(x)) * up(x))."""

    def __init__(self, spec: str, dtype=torch.float32, hidden: int = 48, act=None) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = (build(spec, IN, hidden, bias=False, dtype=dtype).init_() for _ in range(2))
        self.down_proj = build(spec, hidden, IN, bias=False, dtype=dtype).init_()
        self.act_fn = nn.SiLU() if act is None else act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rel_rms(a, ref) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def _interpret_report() -> dict:
    """In the subprocess: each structure's fused q/k/v against float64, eager and compiled, with the number of group
    products per forward."""
    from structmat.kernels import decode, dispatch, ops

    ops.POISON = True  # (an output element a kernel does not write shows as NaN)
    calls = []  # group products run (eager, or a compiled graph's custom op body): the op's output is 3 members wide

    runs = [0]  # every decode product run

    def counted(name, body):
        def run(*args, **kwargs):
            runs[0] += 1
            y = body(*args, **kwargs)
            if y.shape[-1] >= 3 * OUT:  # (a single member, or o_proj: narrower)
                calls.append(name)
            return y
        return run

    made = [0]  # plans made: a second call like the first must make none (the plans are kept)

    def counted_plan(name, plan):
        def make(*args, **kwargs):
            made[0] += 1
            return counted(name, plan(*args, **kwargs))
        return make

    for name in SPECS:  # the custom ops' bodies (compiled graphs) and the plans eager calls keep
        setattr(decode, f"_{name}", counted(name, getattr(decode, f"_{name}")))
        decode.PLANS[name] = counted_plan(name, decode.PLANS[name])
    report = {}
    torch.manual_seed(0)
    for name, spec in SPECS.items():
        model = Attention(spec).eval()
        ref64 = Attention(spec, torch.float64).eval()
        ref64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        groups = structmat.fuse_siblings(model)
        report[f"{name}-groups"] = [len(g.members) for g in groups]
        for graphed in (False, True):  # eager choice (host time counts) and a captured call's (GPU time alone)
            dispatch._GRAPHED[0] = True if graphed else None
            for n in (1, 3, 17):
                x = torch.randn(n, 1, IN)
                with torch.inference_mode():
                    calls.clear()
                    y = model(x)
                    ref = ref64(x.double())
                    first_calls, made[0] = list(calls), 0
                    again = model(x)
                report[f"{name}-{'graphed' if graphed else 'eager'}-{n}"] = dict(
                    err=rel_rms(y, ref), calls=first_calls, pending=groups[0]._pending, replanned=made[0],
                    same=torch.equal(again, y),
                    held=groups[0]._x is not None)
        dispatch._GRAPHED[0] = None
        # a member called alone, with another input than its siblings: the group's product, its slice
        with torch.no_grad():
            x, other = torch.randn(1, IN), torch.randn(1, IN)
            dispatch._GRAPHED[0] = True
            model.q_proj(x)
            alone = model.k_proj(other)
            dispatch._GRAPHED[0] = None
        report[f"{name}-alone"] = rel_rms(alone, ref64.k_proj(other.double()))
        report[f"{name}-alone-split"] = groups[0]._inputs_differ  # (its product was not taken: eager calls split)
        groups = structmat.fuse_siblings(model.to(torch.float64).float())  # (a fresh group for what follows)
        # compiled: one group product per forward, lengths 1..6 without a graph per length
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        errs, per_call = [], []
        with torch.no_grad():
            for n in range(1, 7):
                x = torch.randn(n, 1, IN)
                compiled(x)  # (the first call of a graph compiles it)
                calls.clear()
                errs.append(rel_rms(compiled(x), ref64(x.double())))
                per_call.append(list(calls))
        report[f"{name}-compiled"] = dict(max_err=max(errs), calls=per_call,
                                          graphs=int(counters["stats"]["unique_graphs"]),
                                          traced_cleared=groups[0]._traced_x is None and groups[0]._traced_y is None)
    # Monarch and N:M at many tokens (a prefill): one group product for every member (ops.monarch_siblings on each
    # engine; ops.nm over the stacked rows), eager and compiled (one group product in the graph)
    import structmat.kernels as K

    group_runs = [0]
    bodies = {"monarch_siblings": ops.monarch_siblings, "nm": ops.nm}

    def counted_siblings(*args, **kwargs):
        group_runs[0] += 1
        return bodies["monarch_siblings"](*args, **kwargs)

    def counted_nm(x, values, *rest):
        group_runs[0] += values.shape[0] == 3 * OUT  # (the stacked rows; a member's own call has OUT)
        return bodies["nm"](x, values, *rest)

    ops.monarch_siblings, ops.nm = counted_siblings, counted_nm
    for name, engines in (("monarch", ("triton", "cublas")), ("nm", ("auto",))):
        model = Attention(SPECS[name]).eval()
        ref64 = Attention(SPECS[name], torch.float64).eval()
        ref64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        groups = structmat.fuse_siblings(model)
        x = torch.randn(2, 48, IN)  # (96 tokens: above the decode kernels' range)
        ref = ref64(x.double())
        for engine in engines:
            with K.use_backend(engine), torch.inference_mode():
                group_runs[0] = 0
                y = model(x)
                entry = dict(err=rel_rms(y, ref), runs=group_runs[0], held=groups[0]._x is not None)
            torch._dynamo.reset()
            with K.use_backend(engine), torch.no_grad():
                group_runs[0] = 0
                entry["compiled_err"] = rel_rms(torch.compile(model, backend="aot_eager", fullgraph=True)(x), ref)
            entry["compiled_runs"] = group_runs[0]
            report[f"{name}-many-{engine}"] = entry
    ops.monarch_siblings, ops.nm = bodies["monarch_siblings"], bodies["nm"]
    # gated MLPs: two products where the decode kernels run (no SiLU call), eager and compiled
    silu_calls = [0]
    silu = torch.nn.functional.silu

    def counted_silu(*args, **kwargs):
        silu_calls[0] += 1
        return silu(*args, **kwargs)

    torch.nn.functional.silu = counted_silu
    for name, spec in SPECS.items():
        model = MLP(spec).eval()
        ref64 = MLP(spec, torch.float64).eval()
        ref64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        structmat.fuse_siblings(model)
        entry = report[f"{name}-mlp"] = {"installed": "forward" in model.__dict__}
        for graphed in (False, True):
            dispatch._GRAPHED[0] = True if graphed else None
            for n in (1, 3, 17):
                x = torch.randn(n, 1, IN)
                with torch.inference_mode():
                    silu_calls[0] = runs[0] = 0
                    y = model(x)  # (the first call of this shape: it makes the MLP's plan)
                    silu_seen, first_runs = silu_calls[0], runs[0]
                    made[0] = 0
                    again = model(x)
                entry[f"{'graphed' if graphed else 'eager'}-{n}"] = dict(err=rel_rms(y, ref64(x.double())),
                                                                       silu=silu_seen, first_runs=first_runs,
                                                                       replanned=made[0],
                                                                       same=torch.equal(again, y))
        dispatch._GRAPHED[0] = None
        x = torch.randn(2, 48, IN)  # many tokens (a prefill): the group product, then SiLU(gate) * up in one kernel
        with torch.inference_mode():
            silu_calls[0] = 0
            y = model(x)
            silu_seen = silu_calls[0]
        entry["eager-many"] = dict(err=rel_rms(y, ref64(x.double())), silu=silu_seen)
        torch.nn.functional.silu = silu  # (a traced counter would guard on its value: a graph per call)
        torch._dynamo.reset()
        codes = []

        def keep(gm, example_inputs):
            codes.append(gm.code)
            return gm.forward

        compiled = torch.compile(model, backend=keep, fullgraph=True)
        errs = []
        with torch.no_grad():
            for n in range(1, 7):
                x = torch.randn(n, 1, IN)
                errs.append(rel_rms(compiled(x), ref64(x.double())))
        entry["compiled"] = dict(max_err=max(errs), graphs=len(codes), first_silu="silu" in codes[0],
                                 first_ops=codes[0].count("torch.ops.structmat.decode_"))
        structmat.unfuse_siblings(model)
        entry["unfused"] = "forward" not in model.__dict__
        torch.nn.functional.silu = counted_silu
    torch.nn.functional.silu = silu
    # a tiny structured Llama (HF): greedy decode with its KV cache gives the unfused model's tokens
    from structmat.plan import Plan
    from structmat.train.models import structured_llama

    llama = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dispatch._GRAPHED[0] = True
    for spec in ("monarch:nblocks=4,ratio=0.5", "lowrank:ratio=0.5"):
        model = structured_llama("125m", 96, Plan([(linears, spec)]), max_seq_len=64, **llama).eval()
        ids = torch.randint(0, 96, (1, 5))
        with torch.no_grad():
            plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
            plain_logits = model(plain).logits
            groups = structmat.fuse_siblings(model)
            calls.clear()
            fused = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
            fused_logits = model(plain).logits
        report[f"llama-{spec}"] = dict(groups=sorted(len(g.members) for g in groups), same=torch.equal(plain, fused),
                                       logits_err=rel_rms(fused_logits, plain_logits), calls=len(calls),
                                       gated=sum("forward" in m.__dict__ for m in model.modules()))
    dispatch._GRAPHED[0] = None
    # cross-attention at one token (k and v read another input): one wasted group product, then the members' own
    cross = CrossAttention(SPECS["lowrank"]).eval()
    cross64 = CrossAttention(SPECS["lowrank"], torch.float64).eval()
    cross64.load_state_dict({k: v.double() for k, v in cross.state_dict().items()})
    (group,) = structmat.fuse_siblings(cross)
    memory, errs = torch.randn(1, 1, IN), []
    with torch.inference_mode():
        calls.clear()
        for _ in range(3):
            x = torch.randn(1, 1, IN)
            errs.append(rel_rms(cross(x, memory), cross64(x.double(), memory.double())))
    report["cross-1"] = dict(calls=list(calls), split=group._inputs_differ, max_err=max(errs))
    # grouped-query attention: N:M's stacks are rows, so q (twice as wide) fuses with k and v; eager at few and many
    # tokens, and compiled
    gqa, gqa64 = GQA(SPECS["nm"]).eval(), GQA(SPECS["nm"], torch.float64).eval()
    gqa64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in gqa.state_dict().items()})
    gqa_groups = structmat.fuse_siblings(gqa)
    gqa_errs = {}
    calls.clear()
    with torch.inference_mode():
        for n in (1, 3, 17, 70):
            x = torch.randn(1, n, IN)
            gqa_errs[f"eager-{n}"] = rel_rms(gqa(x), gqa64(x.double()))
    eager_calls = list(calls)
    torch._dynamo.reset()
    compiled = torch.compile(gqa, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for n in (1, 3):
            x = torch.randn(1, n, IN)
            gqa_errs[f"compiled-{n}"] = rel_rms(compiled(x), gqa64(x.double()))
    report["gqa-nm"] = dict(widths=[g.widths for g in gqa_groups], errs=gqa_errs, eager_calls=eager_calls)
    # compiled after that split (a decode step compiled after an eager prefill found the inputs differ): each member
    # runs its own product in the graph, none the group's (widths: the decode products' output columns)
    torch._dynamo.reset()
    widths = []

    def backend(gm, example_inputs):
        widths.extend(int(node.meta["example_value"].shape[-1]) for node in gm.graph.nodes
                      if node.op == "call_function" and "decode_lowrank" in str(node.target))
        return gm.forward

    compiled = torch.compile(cross, backend=backend, fullgraph=True)
    with torch.no_grad():
        x = torch.randn(1, 1, IN)
        err = rel_rms(compiled(x, memory), cross64(x.double(), memory.double()))
    report["cross-1-compiled"] = dict(widths=widths, err=err)
    return report


@pytest.fixture(scope="module")
def interpret_report():
    return interpreter_report(__file__)


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_siblings_match_reference_interpreter(interpret_report, name):
    """One group product per forward where the members' dispatch takes the decode kernels (1-17 tokens), each
    member's slice equal to its float64 reference; the group holds nothing once every member took its slice."""
    assert interpret_report[f"{name}-groups"] == [3]  # q/k/v; o_proj reads another input: not a sibling
    for mode in ("eager", "graphed"):
        for n in (1, 3, 17):
            entry = interpret_report[f"{name}-{mode}-{n}"]
            assert entry["err"] <= TOL, (name, mode, n, entry)
            assert entry["calls"] in ([], [name]), entry  # (none: the members' own paths, e.g. low-rank's cuBLAS)
            assert entry["pending"] == 0 and not entry["held"], entry
            assert entry["replanned"] == 0 and entry["same"], entry  # (the kept plans: nothing invalidated)
    assert interpret_report[f"{name}-graphed-1"]["calls"] == [name]  # one token in a graph: always the kernels
    assert interpret_report[f"{name}-alone"] <= TOL


@pytest.mark.parametrize("name", list(SPECS))
def test_compiled_fused_siblings_one_product_no_recompile_interpreter(interpret_report, name):
    entry = interpret_report[f"{name}-compiled"]
    assert entry["max_err"] <= TOL, entry
    assert entry["graphs"] <= 2, entry  # length 1 (static) and one dynamic graph for 2..6
    assert entry["calls"][0] == [name], entry  # one token: one group product for q, k and v
    assert all(c in ([], [name]) for c in entry["calls"]), entry
    assert entry["traced_cleared"], entry


@pytest.mark.parametrize("case", ["monarch-many-triton", "monarch-many-cublas", "nm-many-auto"])
def test_siblings_at_many_tokens_one_group_product_interpreter(interpret_report, case):
    """A prefill through fused q/k/v: one group product for the three members (Monarch: two grouped launches on
    either engine; N:M: the tiles of the stacked rows), eager and compiled, each member's slice equal to its float64
    reference; nothing held afterwards."""
    entry = interpret_report[case]
    assert entry["runs"] == 1 and entry["err"] <= TOL and not entry["held"], entry
    assert entry["compiled_runs"] == 1 and entry["compiled_err"] <= TOL, entry


@pytest.mark.parametrize("name", ["monarch", "lowrank"])
def test_siblings_at_many_tokens_in_process(monkeypatch, name):
    """Monarch's grouped product on the cuBLAS engine in this process (strided-batched ``torch.bmm``, which runs on
    CPU tensors) and low-rank's (one GEMM, one strided-batched GEMM): one group product per forward, each member's
    slice equal to its float64 reference; training through the members takes their own paths (no backward)."""
    from structmat import siblings
    from structmat.kernels import dispatch, ops

    monkeypatch.setattr(dispatch, "INTERPRET", True)  # (CPU tensors may take the kernel engines)
    runs = [0]
    owner, attr = (ops, "monarch_siblings") if name == "monarch" else (siblings, "_lowrank_siblings")
    body = getattr(owner, attr)

    def counted(*args, **kwargs):
        runs[0] += 1
        return body(*args, **kwargs)

    monkeypatch.setattr(owner, attr, counted)
    torch.manual_seed(0)
    model = Attention(SPECS[name]).eval()
    ref64 = Attention(SPECS[name], torch.float64).eval()
    ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    groups = structmat.fuse_siblings(model)
    x = torch.randn(2, 48, IN)
    asked = [0]  # (the members' later calls are their eager forms, SiblingGroup.eager_member: output() not asked)
    output = siblings.SiblingGroup.output
    monkeypatch.setattr(siblings.SiblingGroup, "output",
                        lambda *args: (asked.__setitem__(0, asked[0] + 1), output(*args))[1])
    with structmat.kernels.use_backend("cublas"):
        with torch.inference_mode():
            y = model(x)
            assert runs[0] == 1 and groups[0]._x is None and asked[0] == 3
            assert rel_rms(y, ref64(x.double())) <= TOL
            assert torch.equal(model(x), y) and runs[0] == 2 and asked[0] == 3  # (the kept plans)
            assert groups[0]._x is None
        xs = x.clone().requires_grad_()
        model(xs).sum().backward()
    assert runs[0] == 2 and xs.grad is not None
    assert all(p.grad is not None for p in model.q_proj.parameters())


def test_group_readies_what_a_capture_runs_instead(monkeypatch):
    """Where eager calls ran the group's product but a CUDA-graph capture of the same input chooses otherwise (by GPU
    time alone: Monarch at 2-64 tokens takes the grouped GEMM on each member's own path), the planning eager call
    runs that path once, outside the capture (a capture must not build or autotune kernels; on the H100 the members'
    grouped GEMM autotuned inside a capture and broke it); once per distinct member shape, and nothing where the
    capture takes what eager calls ran."""
    from structmat.kernels import dispatch, ops

    runs = []
    monkeypatch.setitem(dispatch._OPS, "monarch", (
        lambda x, R, L: ("triton" if dispatch._GRAPHED[0] else "cublas") if x.shape[0] > 64 else
        ("triton" if dispatch._GRAPHED[0] else "decode"),
        lambda choice: (lambda x, R, L: runs.append(("own", choice, x.shape[0], tuple(R.shape))))))
    monkeypatch.setattr(ops, "monarch_siblings", lambda x, R, L, g, engine: (
        runs.append(("group", engine, g)), x.new_zeros(x.shape[0], g * OUT))[1])
    monkeypatch.setattr(ops, "fused_applies", lambda *args: False)
    model = Attention(SPECS["monarch"]).eval()
    (group,) = structmat.fuse_siblings(model)
    member = model.q_proj
    few, many = torch.randn(1, 16, IN), torch.randn(1, 300, IN)
    group._ready_capture(member, few, False)  # (eager ran the members' own paths: their plans ready themselves)
    assert runs == []
    group._ready_capture(member, few, True)  # (eager ran the group's decode product; a capture: each member's own)
    assert runs == [("own", "triton", 16, tuple(member.R.shape))]  # (three members of one shape: run once)
    runs.clear()
    group._ready_capture(member, many, "cublas")  # (a capture takes the group's product under another engine)
    assert runs == [("group", "triton", 3)]
    runs.clear()
    group._ready_capture(member, many, "triton")  # (the same engine as eager's: nothing to ready)
    assert runs == []
    assert dispatch._GRAPHED[0] is None


class CrossAttention(Attention):
    """q reads one input, k and v another (an encoder-decoder's cross-attention, as BART names its projections)."""

    def forward(self, x, memory):
        return self.o_proj(self.q_proj(x) * self.k_proj(memory).sigmoid() + self.v_proj(memory))


def test_siblings_reading_different_inputs_at_one_token_split_interpreter(interpret_report):
    """Cross-attention at one token: its first call wastes one group product, then each member runs its own decode
    kernel (eager, and in a step compiled afterwards); a member called alone with another input splits its group
    the same way."""
    entry = interpret_report["cross-1"]
    assert entry["calls"] == ["lowrank"] and entry["split"] and entry["max_err"] <= TOL, entry
    entry = interpret_report["cross-1-compiled"]  # (q, k, v and o: each its own product, OUT columns)
    assert entry["widths"] == [OUT] * 4 and entry["err"] <= TOL, entry
    assert all(interpret_report[f"{name}-alone-split"] for name in SPECS)


def test_siblings_reading_different_inputs_at_many_tokens_split(monkeypatch):
    """Fused siblings whose inputs differ at many tokens (cross-attention): the first forward wastes one group
    product, then the members run their own paths (a wasted product costs a prefill's projections); right outputs
    throughout, and few tokens keep the group."""
    from structmat.kernels import dispatch, ops

    monkeypatch.setattr(dispatch, "INTERPRET", True)  # (the cuBLAS engine on CPU tensors, as above)
    runs = [0]
    body = ops.monarch_siblings

    def counted(*args, **kwargs):
        runs[0] += 1
        return body(*args, **kwargs)

    monkeypatch.setattr(ops, "monarch_siblings", counted)
    torch.manual_seed(0)
    model = CrossAttention(SPECS["monarch"]).eval()
    ref64 = CrossAttention(SPECS["monarch"], torch.float64).eval()
    ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    (group,) = structmat.fuse_siblings(model)
    x, memory = torch.randn(2, 48, IN), torch.randn(2, 48, IN)  # (same length: this toy multiplies q and k)
    with structmat.kernels.use_backend("cublas"), torch.inference_mode():
        ys = [model(x, memory) for _ in range(3)]
    assert runs[0] == 1 and group._inputs_differ and group._x is None
    assert all(rel_rms(y, ref64(x.double(), memory.double())) <= TOL for y in ys)
    torch._dynamo.reset()  # compiled: the same split while tracing, then graphs of the members' own paths
    (group,) = structmat.fuse_siblings(model.to(torch.float64).float())  # (a fresh group: moving dissolved the old)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with structmat.kernels.use_backend("cublas"), torch.no_grad():
        ys = [compiled(x, memory) for _ in range(3)]
    assert group._inputs_differ and all(rel_rms(y, ref64(x.double(), memory.double())) <= TOL for y in ys)
    fused = Attention(SPECS["monarch"]).eval()  # (siblings that share their input keep the group product)
    (shared,) = structmat.fuse_siblings(fused)
    with structmat.kernels.use_backend("cublas"), torch.inference_mode():
        runs[0] = 0
        for _ in range(3):
            fused(x)
    assert runs[0] == 3 and not shared._inputs_differ


@pytest.mark.parametrize("spec", ["monarch:nblocks=4,ratio=0.5", "lowrank:ratio=0.5"])
def test_fused_siblings_in_hf_llama_generate_interpreter(interpret_report, spec):
    """A structured HF Llama fused (q/k/v and gate/up per layer) generates the unfused model's tokens."""
    entry = interpret_report[f"llama-{spec}"]
    assert entry["groups"] == [2, 2, 3, 3] and entry["gated"] == 2, entry  # (both layers' MLPs run as two products)
    assert entry["same"] and entry["logits_err"] <= TOL and entry["calls"] > 0, entry


@pytest.mark.parametrize("name", list(SPECS))
def test_gated_mlp_runs_as_two_products_interpreter(interpret_report, name):
    """A fused gated MLP: where the decode kernels run (one token in a graph; eager where the members take them) the
    MLP is the group product and the down product, which forms SiLU(gate) * up on load (no SiLU call, none in the
    compiled one-token graph); at many tokens the group product and SiLU(gate) * up in one kernel; elsewhere the MLP's
    own forward; the float64 reference's output either way; unfuse_siblings gives the class's forward back."""
    entry = interpret_report[f"{name}-mlp"]
    assert entry["installed"] and entry["unfused"], entry
    for mode in ("eager", "graphed"):
        for n in (1, 3, 17):
            assert entry[f"{mode}-{n}"]["err"] <= TOL, (mode, n, entry)
            # a second call like the first runs the kept plans (no plan made, no layer's plans invalidated)
            assert entry[f"{mode}-{n}"]["replanned"] == 0 and entry[f"{mode}-{n}"]["same"], (mode, n, entry)
            if entry[f"{mode}-{n}"]["silu"] == 0:  # (the two products ran; the planning call runs each once: a
                assert entry[f"{mode}-{n}"]["first_runs"] == 2, (mode, n, entry)  # capture would keep a second run)
    assert entry["graphed-1"]["silu"] == 0, entry
    # many tokens: the activation in one kernel where the group runs its product (not block-diagonal's, whose members
    # run their own paths there, nor low-rank's here, whose members take the reference at these sizes on the CPU)
    assert entry["eager-many"]["err"] <= TOL, entry
    assert entry["eager-many"]["silu"] == (name in ("blockdiag", "lowrank")), entry
    compiled = entry["compiled"]
    assert compiled["max_err"] <= TOL and compiled["graphs"] <= 2, compiled
    assert compiled["first_ops"] == 2 and not compiled["first_silu"], compiled  # (group product, down with act)


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping (reference path, this process)
# ---------------------------------------------------------------------------------------------------------------


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


@pytest.mark.parametrize("name", list(SPECS))
def test_fusion_adds_no_memory_and_keeps_state_dict(name):
    torch.manual_seed(0)
    model = Attention(SPECS[name]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    x = torch.randn(2, 3, IN)
    with torch.no_grad():
        ref = model(x)
    storages = len(_storages(model))
    groups = structmat.fuse_siblings(model)
    assert len(groups) == 1 and [m for m in groups[0].members] == [model.q_proj, model.k_proj, model.v_proj]
    # the members' factors are views of one stack per factor: fewer storages, the same bytes
    assert len(_storages(model)) < storages
    stacked = sum(t.numel() * t.element_size() for t in groups[0].stacks)
    own = sum(t.numel() * t.element_size() for m in groups[0].members for n, t in m.named_parameters() if n != "bias")
    own += sum(t.numel() * t.element_size() for m in groups[0].members for t in m.buffers())
    assert stacked == own
    assert sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) == nbytes
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # (many tokens on CPU: every member's own path)
    # an in-place update of a member's factor writes into the stack
    first = next(t for n, t in model.k_proj.named_parameters() if n != "bias")
    total = sum(float(s.double().sum()) for s in groups[0].stacks)
    with torch.no_grad():
        first.add_(1.0)
    assert sum(float(s.double().sum()) for s in groups[0].stacks) == pytest.approx(total + first.numel())


def test_checkpoint_of_a_fused_llama_loads_unfused(tmp_path):
    from structmat.plan import Plan
    from structmat.train.models import structured_llama

    torch.manual_seed(0)
    llama = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
    model = structured_llama("125m", 96, Plan([(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
                                                "monarch:nblocks=4,ratio=0.5")]), max_seq_len=64, **llama).eval()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    assert len(structmat.fuse_siblings(model)) == 4
    structmat.save_pretrained(model, tmp_path / "ckpt")
    loaded = structmat.load_pretrained(tmp_path / "ckpt").eval()
    assert all(m._sibling_group is None for m in loaded.modules() if isinstance(m, structmat.StructuredLinear))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref) and torch.equal(model(ids).logits, ref)


def test_moving_or_loading_dissolves_the_group_and_unfuse_restores_storage():
    torch.manual_seed(0)
    model = Attention(SPECS["lowrank"]).eval()
    x = torch.randn(1, IN, dtype=torch.float64)
    structmat.fuse_siblings(model)
    assert model.q_proj._sibling_group is not None
    model.double()  # replaces every tensor: the group would compute with the old ones
    assert all(m._sibling_group is None for m in (model.q_proj, model.k_proj, model.v_proj))
    with torch.no_grad():
        ref = model(x)
    groups = structmat.fuse_siblings(model)
    assert len(groups) == 1
    model.load_state_dict(model.state_dict())
    assert model.q_proj._sibling_group is None
    structmat.fuse_siblings(model)
    model.k_proj.V = nn.Parameter(model.k_proj.V.detach().clone())  # assigning a factor
    assert model.q_proj._sibling_group is None and model.v_proj._sibling_group is None
    structmat.fuse_siblings(model)
    assert structmat.unfuse_siblings(model) == 1
    ptrs = [m.U.untyped_storage().data_ptr() for m in (model.q_proj, model.k_proj, model.v_proj)]
    assert len(set(ptrs)) == 3 and model.q_proj._sibling_group is None
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_training_through_fused_members_takes_their_own_path():
    """With gradients on, each member runs its own (differentiable) path; the gradients are the unfused model's."""
    torch.manual_seed(0)
    model = Attention(SPECS["monarch"])
    x = torch.randn(4, IN)
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    structmat.fuse_siblings(model)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-6, atol=1e-7), n


def linear_weights_seen(call):
    """(the weight shapes ``F.linear`` was called with during ``call()``, its result)."""
    seen, handle = [], torch.nn.functional.linear
    torch.nn.functional.linear = lambda a, w, b=None: seen.append(tuple(w.shape)) or handle(a, w, b)
    try:
        return seen, call()
    finally:
        torch.nn.functional.linear = handle


def test_dense_siblings_run_one_gemm():
    """Dense-structured siblings (a model structured only in part) fuse too: one GEMM over the stacked rows."""
    torch.manual_seed(0)
    model = Attention("dense").eval()
    x = torch.randn(1, 1, IN)
    with torch.no_grad():
        ref = model(x)
        assert len(structmat.fuse_siblings(model)) == 1
        seen, y = linear_weights_seen(lambda: model(x))
    assert seen[0] == (3 * OUT, IN) and (3 * OUT, IN) not in seen[1:]
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_siblings_of_different_widths_fuse_where_stacks_are_rows_interpreter(interpret_report):
    """Grouped-query attention (q wider than k and v) with N:M: one group of all three (its stacks are the members'
    rows), each member's columns right against float64 at 1-70 tokens, eager and compiled, one group product per
    forward at few tokens."""
    entry = interpret_report["gqa-nm"]
    assert entry["widths"] == [[2 * OUT, OUT, OUT]], entry
    assert all(v <= TOL for v in entry["errs"].values()) and len(entry["errs"]) == 6, entry
    assert entry["eager_calls"] == ["nm"] * 3, entry  # (1, 3 and 17 tokens: one product each; 70: the tiles)


def test_dense_siblings_of_different_widths_fuse():
    """Dense-structured GQA projections fuse into one GEMM over rows of different heights; the other structures'
    grouped kernels take equal members (q stays alone, k and v fuse); state dict and unfuse as for equal members."""
    torch.manual_seed(0)
    model = GQA("dense").eval()
    x = torch.randn(2, 3, IN)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        (group,) = structmat.fuse_siblings(model)
        assert group.widths == [2 * OUT, OUT, OUT] and group.offsets == [0, 2 * OUT, 3 * OUT]
        seen, y = linear_weights_seen(lambda: model(x))
    assert seen == [(4 * OUT, IN)] and torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    # the biases stacked too (the GEMM adds them; members add none of their own), members' biases views of it
    assert group.bias is not None and group.bias.shape == (4 * OUT,)
    assert model.k_proj.bias.data_ptr() == group.bias.data_ptr() + 2 * OUT * group.bias.element_size()
    assert structmat.unfuse_siblings(model) == 1
    assert model.k_proj.bias.data_ptr() != group.bias.data_ptr() + 2 * OUT * group.bias.element_size()
    with torch.no_grad():
        assert torch.allclose(model(x), ref, rtol=1e-6, atol=1e-6)
    for name in ("lowrank", "monarch", "blockdiag"):
        groups = structmat.fuse_siblings(GQA(SPECS[name]))
        assert [g.widths for g in groups] == [[OUT, OUT]], name


def test_only_equal_siblings_fuse():
    model = Attention(SPECS["lowrank"])
    model.v_proj = build("lowrank:rank=4", IN, OUT)  # another size: q and k fuse, v stays alone
    groups = structmat.fuse_siblings(model)
    assert [len(g.members) for g in groups] == [2] and model.v_proj._sibling_group is None
    padded = Attention("blockdiag:nblocks=3,pad=true")
    assert structmat.fuse_siblings(padded) == []  # (padded layers keep their own path)
    mixed = Attention(SPECS["lowrank"])
    mixed.k_proj = build(SPECS["monarch"], IN, OUT)
    assert [len(g.members) for g in structmat.fuse_siblings(mixed)] == [2]  # q and v
    unbiased = Attention(SPECS["lowrank"])  # (a bias or none: stacked biases are all the members' or none)
    unbiased.v_proj = build(SPECS["lowrank"], IN, OUT, bias=False)
    (group,) = structmat.fuse_siblings(unbiased)
    assert group.members == [unbiased.q_proj, unbiased.k_proj] and group.bias is not None


def test_gated_mlp_only_where_the_forward_is_gated_silu():
    """The two-product MLP is installed only on a gated SiLU MLP whose forward computes down(SiLU(gate) * up): not
    with another activation, another formula, unfused siblings (different sizes) or gated_mlp=False."""
    torch.manual_seed(0)
    spec = SPECS["lowrank"]
    assert "forward" in _fused(MLP(spec)).__dict__
    assert "forward" not in _fused(MLP(spec, act=nn.GELU())).__dict__
    assert "forward" not in _fused(MLP(spec), gated_mlp=False).__dict__

    class Other(MLP):
        def forward(self, x):  # (same children, another formula)
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x) + 1)

    assert "forward" not in _fused(Other(spec)).__dict__
    mlp = MLP(spec)
    mlp.up_proj = build("lowrank:rank=5", IN, 48, bias=False).init_()  # (unequal siblings: no group)
    assert "forward" not in _fused(mlp).__dict__
    mlp = MLP(spec)
    with torch.no_grad():
        mlp.down_proj.U.fill_(float("nan"))
    assert "forward" not in _fused(mlp).__dict__  # (a non-finite check output: nothing to compare; it raised before)


def _fused(model: nn.Module, **kwargs) -> nn.Module:
    structmat.fuse_siblings(model, **kwargs)
    return model


def test_fuse_siblings_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        structmat.fuse_siblings("model")
    with pytest.raises(ValueError, match="tuples of child names"):
        structmat.fuse_siblings(nn.Linear(2, 2), names=[("q_proj", "")])
    with pytest.raises(TypeError, match="nn.Module"):
        structmat.unfuse_siblings(None)


class Block(nn.Module):
    """q/k/v and gate/up of the bench-infer shape (hidden 2048, SwiGLU 8192)."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        dev, dt = "cuda", torch.bfloat16
        self.q_proj, self.k_proj, self.v_proj = (build(spec, 2048, 2048, False, device=dev, dtype=dt).init_()
                                                 for _ in range(3))
        self.gate_proj, self.up_proj = (build(spec, 2048, 8192, False, device=dev, dtype=dt).init_() for _ in range(2))

    def forward(self, x):
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gate_proj(x), self.up_proj(x)]


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["lowrank:ratio=0.5", "monarch:nblocks=4,ratio=0.5", "blockdiag:nblocks=4",
                                  "nm:n=2,m=4", "dense"])
def test_fused_siblings_match_reference_gpu(spec):
    """bf16 at the bench shape, 1-64 tokens (the group product: every member's slice) and 300 (Monarch and low-rank:
    the group's two launches, siblings.MANY_TOKEN_OPS; the others: each member's own path on its strided view),
    eager and replayed from a CUDA graph, against float64 (bf16 tolerance, as the decode kernels' GPU test)."""
    torch.manual_seed(0)
    model = Block(spec).eval()
    dense = [m.to_dense().double() for m in (model.q_proj, model.k_proj, model.v_proj, model.gate_proj, model.up_proj)]
    groups = structmat.fuse_siblings(model)
    assert sorted(len(g.members) for g in groups) == [2, 3]
    for n in (1, 4, 16, 64, 300):  # (300: many tokens)
        x = torch.randn(1, n, 2048, device="cuda", dtype=torch.bfloat16)
        refs = [x.double() @ w.T for w in dense]
        with torch.no_grad():
            eager = model(x)
            static = model(x)  # (plans made; the capture replays them)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = model(x)
            graph.replay()
            torch.cuda.synchronize()
        for outs in (eager, static):
            errs = [rel_rms(y.cpu(), r.cpu()) for y, r in zip(outs, refs)]
            assert max(errs) <= 3e-2, (spec, n, errs)
        assert all(g._x is None for g in groups)


@pytest.mark.gpu
def test_siblings_of_different_widths_match_reference_gpu():
    """2:4 grouped-query projections of a Llama-3-like shape (q 2048 -> 2048, k and v 2048 -> 512) with biases (as
    Qwen2's), bf16, fused into one group: 1-64 tokens (one decode product) and 300 (the tiles of the stacked rows),
    eager and replayed from a CUDA graph, against float64."""
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    model = GQA("nm:n=2,m=4").eval()
    model.q_proj = build("nm:n=2,m=4", 2048, 2048, True, device=dev, dtype=dt).init_()
    model.k_proj, model.v_proj = (build("nm:n=2,m=4", 2048, 512, True, device=dev, dtype=dt).init_()
                                  for _ in range(2))
    for m in (model.q_proj, model.k_proj, model.v_proj):  # (biases, as Qwen2's q/k/v: stacked, one add)
        torch.nn.init.normal_(m.bias, std=0.5)
    dense = [(m.to_dense().double(), m.bias.double()) for m in (model.q_proj, model.k_proj, model.v_proj)]
    (group,) = structmat.fuse_siblings(model)
    assert group.widths == [2048, 512, 512] and group.bias is not None
    for n in (1, 4, 16, 64, 300):
        x = torch.randn(1, n, 2048, device=dev, dtype=dt)
        refs = [x.double() @ w.T + b for w, b in dense]
        members = (model.q_proj, model.k_proj, model.v_proj)
        with torch.no_grad():
            eager = [m(x) for m in members]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = [m(x) for m in members]
            graph.replay()
            torch.cuda.synchronize()
        for outs in (eager, static):
            errs = [rel_rms(y.cpu(), r.cpu()) for y, r in zip(outs, refs)]
            assert max(errs) <= 3e-2, (n, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["lowrank:ratio=0.5", "monarch:nblocks=4,ratio=0.5", "nm:n=2,m=4"])
def test_fused_gated_mlp_at_many_tokens_gpu(spec):
    """A fused gated MLP of the bench shape (bf16) at 300 tokens: the gate|up group product, SiLU(gate) * up in one
    kernel (``_triton_decode.gated_rows``), down's own path, against float64 (bf16 tolerance)."""
    from structmat.kernels import _triton_decode

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    model = MLP(spec, dt)  # (its layers rebuilt at the bench shape, on the GPU)
    model.gate_proj, model.up_proj = (build(spec, 2048, 8192, False, device=dev, dtype=dt).init_() for _ in range(2))
    model.down_proj = build(spec, 8192, 2048, False, device=dev, dtype=dt).init_()
    x = torch.randn(1, 300, 2048, device=dev, dtype=dt)
    dense = {n: getattr(model, n).to_dense().double() for n in ("gate_proj", "up_proj", "down_proj")}
    xd = x.double()
    ref = (torch.nn.functional.silu(xd @ dense["gate_proj"].T) * (xd @ dense["up_proj"].T)) @ dense["down_proj"].T
    (group,) = structmat.fuse_siblings(model)
    assert "forward" in model.__dict__  # (the gated MLP's forward installed)
    with torch.no_grad():  # (where the members' own dispatch takes the kernels' GEMMs: the group's product runs)
        engine = group._many_engine(model.gate_proj, x.reshape(-1, 2048))
    calls = [0]
    body = _triton_decode.gated_rows

    def counted(*args):
        calls[0] += 1
        return body(*args)

    _triton_decode.gated_rows = counted
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        _triton_decode.gated_rows = body
    assert calls[0] == (engine is not None) and rel_rms(y.cpu(), ref.cpu()) <= 3e-2, (spec, engine, calls)


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        print(json.dumps(_interpret_report()))


def test_threads_sharing_a_fused_model_get_their_own_outputs():
    """Threads running one fused model: each group call pairs an input only with the product computed for it (the
    bookkeeping is one attribute, read and written whole). Before, a thread could read another's product between its
    check and its read (1 wrong output in 12,000 in four threads at a 1 us switch interval); dense siblings take the
    group product on any device, so this runs on the CPU."""
    import threading

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (build("dense", 32, 32, bias=False) for _ in range(3))

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)

    torch.manual_seed(0)
    model = Attn().eval()
    W = torch.cat([model.q_proj.to_dense(), model.k_proj.to_dense(), model.v_proj.to_dense()])
    assert [len(g.members) for g in structmat.fuse_siblings(model)] == [3]
    wrong, done = [], []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(2000):
            x = torch.randn(1, 2, 32, generator=g)
            with torch.no_grad():
                if not torch.allclose(model(x), x @ W.T, atol=1e-5):
                    wrong.append(seed)
        done.append(seed)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch often: the window is a few bytecodes)
    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert sorted(done) == [0, 1, 2, 3] and wrong == []
