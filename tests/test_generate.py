"""``structmat generate``: a compressed causal LM run on a prompt, measured beside its dense original."""

from __future__ import annotations

import json

import pytest
import torch

from corpora import tiny_llama_folder
from transformers import AutoTokenizer

import structmat
from structmat.cli import main


CHAT = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense Llama with MiniLM's tokenizer, and two structmat folders of it: every block linear low-rank
    (with its tokenizer) and every block linear 2:4 (without one)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("generate")
    dense = tiny_llama_folder(root / "dense", hidden=64, intermediate=128)
    tok = AutoTokenizer.from_pretrained(root / "dense", local_files_only=True)
    for name, spec, with_tokenizer in (("lowrank", "lowrank:ratio=0.5", True), ("nm", "nm:n=2,m=4", False)):
        model = LlamaForCausalLM(dense.config)
        model.load_state_dict(dense.state_dict())
        structmat.structurize(model, {r".*_proj": spec})
        if with_tokenizer:  # (with a chat template, as an instruct model's)
            tok.chat_template = CHAT
            tok.save_pretrained(root / name)
        structmat.save_pretrained(model, root / name)
    return root


def _run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_measures_a_structured_model_beside_its_baseline(models, capsys):
    record = models / "lowrank.json"
    code, text, err = _run(capsys, "--model", models / "lowrank", "--baseline", models / "dense", "--prompt",
                           "import os", "--max-new-tokens", 5, "--rounds", 2, "--json", record)
    assert code == 0, err
    got = json.loads(record.read_text())
    model, base = got["model"], got["baseline"]
    assert model["structured_layers"] == 14 and model["fused_groups"] > 0  # 2 blocks x 7 linears; q/k/v, gate/up
    assert base["structured_layers"] == 0 and base["fused_groups"] == 0
    assert model["loop"] == base["loop"] == "hf"  # (--loop auto on a CPU: HF generate)
    assert len(model["prefill_s"]) == len(model["generate_s"]) == 2 and model["new_tokens"] == 5
    assert model["decode_tokens_per_s"] > 0 and base["decode_tokens_per_s"] > 0
    held = structmat.load_pretrained(models / "lowrank")
    assert model["param_bytes"] == sum(t.numel() * t.element_size() for t in (*held.parameters(), *held.buffers()))
    assert model["param_bytes"] < base["param_bytes"]  # (fused as it ran: fusion added no bytes)
    assert got["vs_baseline"]["param_bytes_ratio"] == pytest.approx(model["param_bytes"] / base["param_bytes"])
    assert text.strip() == got["text"] and got["text"].startswith("import os")
    assert "decode" in err and "vs baseline: decode_speedup" in err
    # fusing the siblings changes no token (greedy): the same text with them unfused
    code, unfused, _ = _run(capsys, "--model", models / "lowrank", "--prompt", "import os", "--max-new-tokens", 5,
                            "--rounds", 1, "--no-fuse")
    assert code == 0 and unfused == text
    # compiled (static cache; dynamo with its eager backend: the graph, not inductor's C++ build): the same text,
    # graphs compiled in the warm-up and none while timed
    record = models / "compiled.json"
    code, compiled, err = _run(capsys, "--model", models / "lowrank", "--prompt", "import os", "--max-new-tokens", 5,
                               "--rounds", 2, "--compile", "eager", "--json", record)
    assert code == 0 and compiled == text, err
    got = json.loads(record.read_text())["model"]
    assert got["compile_backend"] == "eager" and got["graphs_in_warmup"] >= 1 and got["graphs_in_rounds"] == 0
    # a batch of 3 copies of the prompt: tokens/s counts every row
    record = models / "batch.json"
    code, batched, err = _run(capsys, "--model", models / "lowrank", "--prompt", "import os", "--max-new-tokens", 5,
                              "--rounds", 1, "--batch", 3, "--json", record)
    assert code == 0 and batched.startswith("import os") and "x batch 3" in err
    got = json.loads(record.read_text())["model"]
    assert got["batch"] == 3 and got["decode_tokens_per_s"] == pytest.approx(
        3 * 4 / (got["generate_s"][0] - got["prefill_s"][0]))
    sampled = [_run(capsys, "--model", models / "lowrank", "--max-new-tokens", 4, "--rounds", 1, "--sample",
                    "--seed", 3)[1] for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded: the same draw


def test_graph_loop_decodes_hf_generates_tokens_without_hf_per_token_work(models, capsys):
    """``--loop graph``: structmat's greedy loop over a static cache (a CUDA graph per step on a GPU, the step as a
    function here) writes the tokens HF generate writes, compiled or not, and a second call reuses its loop."""
    args = ("--model", models / "lowrank", "--prompt", "import os", "--max-new-tokens", 6, "--rounds", 2)
    code, text, err = _run(capsys, *args)
    assert code == 0, err
    record = models / "loop.json"
    code, looped, err = _run(capsys, *args, "--loop", "graph", "--baseline", models / "dense", "--json", record)
    assert code == 0 and looped == text, err
    got = json.loads(record.read_text())
    assert got["model"]["loop"] == got["baseline"]["loop"] == "graph" and "--loop graph" in err
    assert got["model"]["decode_tokens_per_s"] > 0 and len(got["model"]["generate_s"]) == 2
    record = models / "loop-compiled.json"
    code, compiled, err = _run(capsys, *args, "--loop", "graph", "--compile", "eager", "--json", record)
    assert code == 0 and compiled == text, err
    got = json.loads(record.read_text())["model"]
    assert got["graphs_in_warmup"] >= 1 and got["graphs_in_rounds"] == 0
    code, _, err = _run(capsys, *args, "--loop", "graph", "--sample")
    assert code == 2 and "--loop graph decodes greedily" in err


def test_loop_auto_takes_structmats_loop_for_greedy_decoding_on_a_gpu_only():
    from structmat.generate import resolve_loop

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_loop("auto", gpu, sample=False) == "graph"
    assert resolve_loop("auto", gpu, sample=True) == "hf"  # (the loop is greedy)
    assert resolve_loop("auto", cpu, sample=False) == "hf"
    assert [resolve_loop(given, d, False) for given in ("hf", "graph") for d in (gpu, cpu)] == ["hf", "hf", "graph",
                                                                                                  "graph"]
    # a model whose class does not declare a step that compiles as one graph over a static cache keeps HF generate
    from transformers import LlamaForCausalLM

    class Undeclared(torch.nn.Module):
        _can_compile_fullgraph = False

    assert resolve_loop("auto", gpu, False, LlamaForCausalLM) == "graph"
    assert resolve_loop("auto", gpu, False, Undeclared()) == "hf"
    assert resolve_loop("graph", gpu, False, Undeclared()) == "graph"  # (asked for: tried, and its error says so)


def test_graph_loop_suppresses_end_of_sequence_and_refuses_another_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.generate import GraphLoop

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=40)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[3, 4, 5]])
    free = GraphLoop(model, ids, 8, None)(ids, 8)[0, 3:]  # (the loop builds and runs in inference mode itself)
    model.generation_config.eos_token_id = [int(free[0]), int(free[1])]  # the tokens it picked: now forbidden
    with torch.inference_mode():
        loop = GraphLoop(model, ids, 8, None)
        held = loop(ids, 8)[0, 3:]
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0, cache_implementation="static")[0, 3:]
    assert not set(held.tolist()) & {int(free[0]), int(free[1])} and torch.equal(held, want)
    assert torch.equal(loop(ids, 3)[0, 3:], held[:3])  # (a shorter call on the same loop: the budget's start)
    two = torch.tensor([[3, 4, 5], [7, 1, 2]])  # (a batch of different prompts: each row its own tokens)
    with torch.inference_mode():
        rows = GraphLoop(model, two, 5, None)(two, 5)
        want = model.generate(two, attention_mask=torch.ones_like(two), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(rows, want) and not torch.equal(rows[0, 3:], rows[1, 3:])
    with torch.inference_mode():  # (the smallest budget: the warm-up steps stay inside it)
        assert torch.equal(GraphLoop(model, ids, 2, None)(ids, 2)[0, 3:], held[:2])
    with pytest.raises(ValueError, match="build a loop for that shape"):
        loop(torch.tensor([[3, 4]]), 2)
    with pytest.raises(ValueError, match="build a loop for that shape"):
        loop(ids, 9)


def test_generate_on_cpu_names_sparse_layers_and_densifies_them_on_request(models, capsys):
    code, _, err = _run(capsys, "--model", models / "nm", "--tokenizer", models / "dense", "--max-new-tokens", 3,
                        "--rounds", 1, "--device", "cpu")
    assert code == 0 and "note: 14 sparse layers" in err and "--densify-sparse" in err
    record = models / "nm.json"
    code, _, err = _run(capsys, "--model", models / "nm", "--tokenizer", models / "dense", "--max-new-tokens", 3,
                        "--rounds", 1, "--device", "cpu", "--densify-sparse", "--json", record)
    assert code == 0 and "note:" not in err
    got = json.loads(record.read_text())["model"]
    assert got["densified_layers"] == 14 and got["structured_layers"] == 0


def test_generate_refuses_bad_input_with_one_line(models, capsys):
    code, _, err = _run(capsys, "--model", models / "nm", "--max-new-tokens", 3)  # saved without a tokenizer
    assert code == 1 and "--tokenizer" in err
    code, _, err = _run(capsys, "--model", "minilm", "--max-new-tokens", 3)
    assert code == 1 and "needs a causal LM" in err
    code, _, err = _run(capsys, "--model", models / "dense", "--max-new-tokens", 1)
    assert code == 2 and "--max-new-tokens must be >= 2" in err
    code, _, err = _run(capsys, "--model", models / "dense", "--batch", 0)
    assert code == 2 and "--batch >= 1" in err
    code, _, err = _run(capsys, "--model", models / "dense", "--device", "nonsense")
    assert code == 2 and "not a device" in err
    code, _, err = _run(capsys, "--model", models / "missing")
    assert code == 1 and "no such model folder" in err


def test_generate_chat_wraps_the_prompt_in_the_template_and_prints_the_reply(models, capsys):
    import torch
    from transformers import AutoTokenizer

    code, reply, err = _run(capsys, "--model", models / "lowrank", "--prompt", "sort a list", "--max-new-tokens", 4,
                            "--rounds", 1, "--chat", "--no-fuse")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(models / "lowrank", local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "sort a list"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    model = structmat.load_pretrained(models / "lowrank").eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert reply.strip() == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    code, _, err = _run(capsys, "--model", models / "dense", "--chat", "--max-new-tokens", 3)
    assert code == 1 and "no chat template" in err


def test_held_bytes_leave_out_the_graph_pools_on_the_measured_device():
    """A model's held bytes leave out what CUDA-graph trees keep live in their private pools (the last outputs of the
    current graph path, freed when another model's graphs run): only default-pool segments of its device count."""
    from structmat.generate import _outside_graph_pools

    segments = [dict(device=0, segment_pool_id=(0, 0), allocated_size=1000),
                dict(device=0, segment_pool_id=(1, 2), allocated_size=300),  # a graph pool on this device
                dict(device=0, segment_pool_id=[1, 5], allocated_size=200),
                dict(device=1, segment_pool_id=(1, 2), allocated_size=7000)]  # another device's pool
    assert _outside_graph_pools(1500, segments, 0) == 1000
    assert _outside_graph_pools(9000, segments, 1) == 2000
    assert _outside_graph_pools(1000, segments[:1], 0) == 1000


@pytest.mark.gpu
def test_generate_compiled_on_gpu_holds_at_least_its_parameters(models, capsys):
    """CUDA graphs (inductor's reduce-overhead) free the process's cuBLAS workspaces while recording: measured against
    a baseline that held them, a compiled model's held bytes read below its parameters (H200, session 19); the graphs'
    pool outputs of the model run first are freed when the second model's graphs run (H100, session 25)."""
    for compile_args in ((), ("--compile", "inductor")):
        record = models / f"held{len(compile_args)}.json"
        code, _, err = _run(capsys, "--model", models / "lowrank", "--baseline", models / "dense", "--device", "cuda",
                            "--dtype", "bfloat16", "--max-new-tokens", 4, "--rounds", 1, "--loop", "hf", *compile_args,
                            "--json", record)
        assert code == 0, err
        got = json.loads(record.read_text())
        for measured in (got["model"], got["baseline"]):
            assert measured["param_bytes"] <= measured["held_bytes"] <= measured["peak_bytes"], compile_args


@pytest.mark.gpu
def test_graph_loop_on_gpu_replays_a_captured_step_with_hf_generates_tokens(models, capsys):
    """On a GPU each token of ``--loop graph`` is one CUDA-graph replay (structured layers in their captured forms),
    eager (the default on a GPU: ``--loop auto``) or compiled by inductor first; float32, so that HF's eager path and
    the captured kernels pick the same tokens."""
    args = ("--model", models / "lowrank", "--device", "cuda", "--dtype", "float32", "--prompt", "import os",
            "--max-new-tokens", 8, "--rounds", 2)
    code, text, err = _run(capsys, *args, "--loop", "hf")
    assert code == 0, err
    for extra in ((), ("--loop", "graph", "--compile", "inductor")):
        record = models / f"gpu-loop{len(extra)}.json"
        code, looped, err = _run(capsys, *args, "--baseline", models / "dense", *extra, "--json", record)
        assert code == 0 and looped == text, (extra, err)
        got = json.loads(record.read_text())
        for measured in (got["model"], got["baseline"]):
            assert measured["loop"] == "graph", extra
            assert measured["param_bytes"] <= measured["held_bytes"] <= measured["peak_bytes"], extra
            assert measured["graphs_in_rounds"] in (None, 0), extra
