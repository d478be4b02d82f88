"""The decode kernels compiled for the H100/H200 (sm_90) on this CPU machine, with Triton's own compiler and ptxas.

Triton's interpreter, which the other CPU tests run the kernels through, checks the arithmetic but not what only the
compiler sees: two of session 6's GPU calls were lost to kernels that ran in the interpreter and failed to compile
(a name assigned in both branches of a runtime ``if``; ``tl.dot`` below 16 wide). Here every decode kernel is compiled
with the launch options its plans give at the bench-infer shapes, and with what Triton knows at such a launch (unit
strides, sizes that are multiples of 16, aligned pointers: ``compile_sm90``): it must compile, fit the H200's shared
memory, and keep its tiles in registers, no local-memory spills (``cuobjdump --dump-resource-usage``). The local
Triton may not be the device's (3.9 here, 3.6 there): shared-memory figures differ between versions (the fp32 plan
that asked the H200's Triton 3.6 for 240 KB compiles to 80 KB here at any stage count), so this test is a first
check, not a substitute for the ``-m gpu`` tests.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from structmat.kernels import _triton_decode as TD  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)
SMEM_BYTES = 227 * 1024  # the H100/H200 opt-in limit per block
SMS = 132
TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


#: What Triton knows at a launch on the bench layouts (its launch specialization: an integer argument equal to 1 is a
#: constant, one divisible by 16 is marked so, and so is a 16-byte-aligned pointer): the unit strides of contiguous
#: operands, and the sizes and strides that are multiples of 16 at the bench shapes (ranks 512 / 816, block ranks of
#: 128-200 times 4 blocks, 2048 / 8192 features; not a block rank itself, 200, nor a count of blocks). Compiled without
#: it a kernel is not the one that runs: the 2:4 tensor-core kernel at 64 tokens took all 255 registers and spilled
#: 112-896 bytes, as launched 56-152 and none.
UNIT_STRIDES = ("s_xk", "s_w1k", "s_tm", "s_ak", "s_w2k", "s_ym", "s_hk", "s_wk", "s_cm")
SIZES_OF_16 = ("M1", "K1", "M2", "K2", "M", "K", "G", "KEPT", "G_SPLIT", "J_SPLIT", "SPLIT_LEN", "ACT_OFF", "s_xg",
               "s_xn", "s_w1g", "s_w1m", "s_ts", "s_tchunk", "s_ag", "s_an", "s_as", "s_w2g", "s_w2m", "s_yg", "s_yn",
               "s_hg", "s_hn", "s_wg", "s_wm", "s_cs", "s_cg", "s_cn", "s_cchunk", "s_vm", "s_pm", "SB", "SB_SPLIT")


def compile_sm90(fn, pointers: dict, constexprs: dict, sass: list | None = None, **options):
    """(shared bytes, stack bytes) of ``fn`` (Triton or Gluon) compiled for sm_90 as launched on the bench layouts
    (UNIT_STRIDES, SIZES_OF_16, pointers 16-byte aligned); every other argument an i32. ``sass``: a list that gets
    the machine code's text."""
    names = fn.arg_names
    constexprs = {**{a: 1 for a in UNIT_STRIDES if a in names}, **constexprs}
    signature = {a: pointers.get(a, "constexpr" if a in constexprs else "i32") for a in names}
    marked = [a for a in names if a in pointers or (a in SIZES_OF_16 and a not in constexprs)]
    source = triton.compiler.ASTSource
    if type(fn).__name__ == "GluonJITFunction":
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=fn, signature=signature, attrs={(names.index(a),): [["tt.divisibility", 16]] for a in marked},
                 constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=H200, options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"structmat-{os.getpid()}-{fn.__name__}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        if sass is not None:
            sass.append(subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout)
    finally:
        os.remove(path)
    return kernel.metadata.shared, int(re.search(r"STACK:(\d+)", usage).group(1))


@pytest.fixture
def gpu_plans(monkeypatch):
    """The plans a 132-SM GPU gets (not the interpreter's small tiles), on this CPU machine."""
    monkeypatch.setattr(TD, "_sms", lambda device_type, index: SMS)
    monkeypatch.setattr(TD, "INTERPRET", False)
    TD.clear_plans()
    yield
    TD.clear_plans()


# (stage-1 groups, rows, reduction; stage-2 groups, rows, reduction): low-rank 50% and Monarch nb=4 at the bench-infer
# layer shapes 2048^2, 2048->8192, 8192->2048
FUSED_SHAPES = {"lowrank-2048": (1, 512, 2048, 1, 2048, 512), "lowrank-2048x8192": (1, 816, 2048, 1, 8192, 816),
                "lowrank-8192x2048": (1, 816, 8192, 1, 2048, 816), "monarch-2048x8192": (4, 800, 512, 4, 2048, 800),
                "monarch-8192x2048": (4, 800, 2048, 4, 512, 800)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_launch_decode_compiles_for_sm90_without_spills(gpu_plans, dtype):
    t = TYPE[dtype]
    pointers = {"X": f"*{t}", "W1": f"*{t}", "T": "*fp32", "W2": f"*{t}", "Y": f"*{t}", "SYNC": "*i32"}
    for name, shape in FUSED_SHAPES.items():
        plan = TD.plan_fused(*shape, False)
        constexprs = {k: plan[k] for k in ("S1", "K1_ITERS", "K2_ITERS", "BM1", "BK1", "BM2", "BK2")}
        for spin, act in ((False, False), (True, False), (False, True)):  # (act: a gated MLP's down product)
            shared, stack = compile_sm90(TD._decode_fused, pointers, {**constexprs, "SPIN_LOAD": spin, "ACT": act},
                                         num_warps=plan["num_warps"], num_stages=TD.FUSED_META["num_stages"])
            assert shared <= SMEM_BYTES and stack == 0, (name, t, spin, act, plan, shared, stack)


# the fused siblings' products (structmat.fuse_siblings): low-rank q/k/v and gate/up, Monarch gate/up
GROUP_SHAPES = {"lowrank-qkv": (1, 1536, 2048, 3, 2048, 512), "lowrank-gate-up": (1, 1632, 2048, 2, 8192, 816),
                "monarch-gate-up": (4, 1600, 512, 8, 2048, 800)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pdl_two_launch_decode_compiles_for_sm90_without_spills(gpu_plans, dtype):
    """The programmatic-dependent-launch pair (stage 1 lets stage 2 start; stage 2 waits with griddepcontrol.wait)
    at the bench shapes and the fused siblings' shapes, with the launch option it is launched with."""
    t = TYPE[dtype]
    for name, shape in {**FUSED_SHAPES, **GROUP_SHAPES}.items():
        plan = TD.plan_fused(*shape, False)
        one = compile_sm90(TD._pdl_stage1, {"X": f"*{t}", "W1": f"*{t}", "T": "*fp32"},
                           {**{k: plan[k] for k in ("S1", "K1_ITERS", "BM1", "BK1")}, "PDL": True,
                            "ACT": name.endswith("8192x2048")},  # (a down product: the gated input formed on load)
                           num_warps=plan["num_warps"], num_stages=1)
        two = compile_sm90(TD._pdl_stage2, {"T": "*fp32", "W2": f"*{t}", "Y": f"*{t}"},
                           {**{k: plan[k] for k in ("S1", "K2_ITERS", "BM2", "BK2")}, "WAIT": 1},
                           num_warps=plan["num_warps"], num_stages=1, launch_pdl=True)
        for shared, stack in (one, two):
            assert shared <= SMEM_BYTES and stack == 0, (name, t, plan, shared, stack)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_multi_token_pdl_second_stage_compiles_for_sm90_without_spills(gpu_plans, dtype):
    """Above one token, low-rank's second stage as the second launch of a PDL pair (``_pdl_stage2_dot``: its first
    weight tile in registers before griddepcontrol.wait, then tensor-core tiles of 16 token rows) at the low-rank
    second stages of the bench shapes, single and fused siblings, and ranks up to 1024."""
    t = TYPE[dtype]
    for groups, rows, rank in ((1, 2048, 512), (1, 8192, 816), (1, 2048, 816), (3, 2048, 512), (2, 8192, 816),
                               (1, 4096, 1024)):
        plan = TD.plan_fused(1, 16, 16, groups, rows, rank, False)
        constexprs = {"PRECISION": "ieee" if dtype == torch.float32 else "tf32", "BLOCK_N": 16, "WAIT": 1,
                      **{k: plan[k] for k in ("K2_ITERS", "BM2", "BK2")}}
        shared, stack = compile_sm90(TD._pdl_stage2_dot, {"H": f"*{t}", "W2": f"*{t}", "Y": f"*{t}"}, constexprs,
                                     num_warps=plan["num_warps"], num_stages=1, launch_pdl=True)
        assert shared <= SMEM_BYTES and stack == 0, (groups, rows, rank, t, plan, shared, stack)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_decode_compiles_for_sm90_and_fits_shared_memory(gpu_plans, dtype):
    """The gemv kernel (block-diagonal, Monarch's and low-rank's two-launch stages) at 1, 16 and 64 tokens, with the
    pipeline stages its launcher gives (capped to SMEM_BUDGET: fp32 at 64 tokens asked 240 KB at 4 stages and failed
    to launch on the H200), without spills at 1-64 tokens (the 1.5-1.8 KB this test recorded at 64 tokens until session
    14 came from compiling without the launch's specialization). Above one token a first stage's splits are summed in
    the kernel (``REDUCE``, the last split's epilogue)."""
    t = TYPE[dtype]
    pointers = {"A": "*fp32", "W": f"*{t}", "C": f"*{t}", "T": "*fp32", "CNT": "*i32"}
    for n in (1, 16, 64):
        for groups, rows, k in ((4, 512, 512), (1, 512, 2048), (1, 2048, 512), (4, 512, 2048), (4, 2048, 800)):
            act = rows == 512  # (as a gated MLP's down product: the input formed on load)
            plan = TD.plan_gemv(n, groups, rows, k, torch.device("cuda", 0), split_ok=True, act=act, reduce=n > 1)
            per_stage = (plan["BLOCK_N"] + plan["BLOCK_M"]) * plan["BLOCK_K"] * dtype.itemsize
            stages = max(1, min(TD.GEMV_META["num_stages"], TD.SMEM_BUDGET // per_stage))
            constexprs = {"PRECISION": "ieee" if dtype == torch.float32 else "tf32", "ACT": act,
                          "REDUCE": plan["splits"] if n > 1 else 1, "PDL": n > 1,
                          **{k_: plan[k_] for k_ in ("BLOCK_N", "BLOCK_M", "BLOCK_K")}}
            shared, stack = compile_sm90(TD._decode_gemv, pointers, constexprs,
                                         num_warps=TD.GEMV_META["num_warps"], num_stages=stages)
            assert shared <= SMEM_BYTES, (n, groups, rows, k, t, plan, stages, shared)
            assert stack == 0, (n, groups, rows, k, t, plan, stack)


def test_nm_decode_compiles_for_sm90(gpu_plans):
    """2:4 at the bench shapes: the row kernel (<= SMALL_TOKENS tokens; for 16-bit values the byte-permute kernel)
    and the expanded-tile kernel above, in shared
    memory; without spills at 1-64 tokens (compiled without the launch's specialization the 64-token tile took 255
    registers and spilled 112-896 bytes; as launched 56-152 registers, none)."""
    pointers = {"X": "*bf16", "V": "*bf16", "P": "*u8", "Y": "*bf16", "T": "*fp32", "CNT": "*i32"}
    for rows, k in ((2048, 2048), (8192, 2048), (2048, 8192)):
        for n in (1, 4, 16, 64):
            dot = TD.use_dot(n)
            plan = {key: v for key, v in TD._plan_nm(n, rows, k // 4, "cuda", 0, dot, k == 8192).items()
                    if key != "SPLIT_LEN"}  # (a runtime argument)
            fn = TD._decode_nm if dot else TD._decode_nm_row
            constexprs = {"NNZ": 2, "GROUP": 4, "PBITS": 2, "ACT": k == 8192, **plan,
                          **({"PRECISION": "tf32", "PERMUTE": True, "PRMT": True} if dot else {})}
            warps = (TD.NM_SMALL_WARPS[0] if TD.small_warps(plan["BLOCK_N"], k == 8192) else TD.NM_META["num_warps"]) \
                if dot else TD.NM_ROW_WARPS[0]
            shared, stack = compile_sm90(fn, pointers, constexprs, num_warps=warps, num_stages=3 if dot else 1)
            assert shared <= SMEM_BYTES and stack == 0, (rows, k, n, fn.__name__, constexprs, shared, stack)
        # 2:4 of bfloat16 at 1-4 tokens: the byte-permute kernel (inline PTX prmt), as launched
        plan = TD._plan_nm(1, rows, k // 4, "cuda", 0, False, False)
        for tokens in (1, 4):
            constexprs = {"BLOCK_M": plan["BLOCK_M"], "BLOCK_G": plan["BLOCK_J"] // 2 if tokens == 1 else 128,
                          "TOKENS": tokens, "PRMT": True, "SPLITS": plan["SPLITS"]}
            shared, stack = compile_sm90(TD._decode_nm24_row, pointers, constexprs, num_warps=TD.NM_ROW_WARPS[0],
                                         num_stages=1)
            assert shared <= SMEM_BYTES and stack == 0, (rows, k, constexprs, shared, stack)
    shared, stack = compile_sm90(TD._gate_rows, {"X": "*bf16", "H": "*bf16"}, {"BLOCK": 1024}, num_warps=4)
    assert stack == 0, stack  # (the gated input formed first, for the one-token down product)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("warps,two,depth,prep", [(4, False, 2, True), (8, False, 2, False), (8, True, 2, True),
                                                  (8, False, 4, True)])
def test_nm24_sparse_mma_compiles_for_sm90_without_spills(dtype, warps, two, depth, prep):
    """The sparse-tensor-core 2:4 kernel (Gluon, inline ``mma.sp``): compiles for sm_90, keeps its fragments in
    registers, issues the sparse MMA (HMMA.SP), loads each lane's values 16 bytes at a time and its codes 8, and
    (PREP) its inputs 16 bytes at a time from their fragment order."""
    from structmat.kernels import _gluon_nm24

    ty = TYPE[dtype]
    code = []
    _, stack = compile_sm90(_gluon_nm24._nm24_mma_sp, {"X": f"*{ty}", "V": f"*{ty}", "P": "*u8", "Y": f"*{ty}", "XF": "*fp32"},
                            {"WARPS": warps, "TWO": two, "DEPTH": depth, "PREP": prep, "FP16": dtype == torch.float16}, sass=code, num_warps=warps)
    assert stack == 0
    assert re.search(r"HMMA\.SP\.16832\.F32" + (r"\.BF16" if dtype == torch.bfloat16 else r" "), code[0])
    blocks = 2 * depth  # (a prologue of DEPTH blocks, DEPTH more in the loop)
    assert code[0].count("LDG.E.128 ") == blocks * (2 + (2 * (1 + two) if prep else 0))  # (rows g, g + 8; inputs)
    assert code[0].count("LDG.E.64 ") == blocks * 2  # (the codes of rows g, g + 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_monarch_fused_many_tokens_compiles_for_sm90_without_spills(dtype, monkeypatch):
    """Monarch's one-launch many-token forward (``_triton_monarch``), at every tile setting its first call on a GPU
    tries: compiles for sm_90, no spills, its programs per SM fit the shared memory, tensor-core products (HGMMA),
    and pipelined loads (cp.async: LDGSTS; a loop Triton could not pipeline would have none). Block ranks that are
    multiples of 8 (every bench shape: 128, 200, 256) take ALIGN8, which must leave no 2-byte load; the first setting
    is compiled without it too; and the training form (SAVE: the intermediate written for the backward)."""
    from structmat.kernels import _triton_monarch as TM

    # (as launched at the bench shapes: sizes and strides multiples of 16, except the block rank C, 200 there)
    monkeypatch.setattr(__import__(__name__), "SIZES_OF_16", SIZES_OF_16 + ("N", "P", "U", "CP", "s_hn", "s_rg",
                                                                              "s_rm", "s_lg", "s_lm"))
    ty = TYPE[dtype]
    # (inference with every setting; training, SAVE, with every setting in bf16 and with the first in fp16)
    cases = [(c, True, False) for c in TM.CONFIGS] + [(TM.CONFIGS[0], False, False)] + [
        (c, True, True) for c in (TM.SAVE_CONFIGS if dtype == torch.bfloat16 else TM.SAVE_CONFIGS[:1])]
    for (BN, BC, BK1, BU, BK2, warps, stages, per_sm, flat, tail), align, save in cases:
        code = []
        shared, stack = compile_sm90(TM._monarch_fused, {a: f"*{ty}" for a in ("X", "R", "L", "Y", "H")},
                                     {"PRECISION": "tf32", "BN": BN, "BC": BC, "BK1": BK1, "BU": BU, "BK2": BK2,
                                      "s_rk": 1, "s_lk": 1, "ALIGN8": align, "FLAT": flat, "TAIL": tail,
                                      "SAVE": save}, sass=code, num_warps=warps, num_stages=stages)
        assert stack == 0 and shared * per_sm <= 228 * 1024, (BN, BC, BU, warps, align, save, shared, stack)
        assert "HGMMA" in code[0] and "LDGSTS" in code[0], (BN, BC, BU, warps, align, save)
        if align:  # (every operand 16 bytes at a time: no 2-byte loads of L's chunks)
            assert "LDG.E.U16" not in code[0], (BN, BC, BU, warps, save)
