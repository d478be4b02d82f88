"""benchmarks/smollm2_heal.py end to end on CPU with a tiny Llama folder and a few steps per part, so the GPU run of
SmolLM2 cannot fail on bookkeeping: every part finishes, the budgets hold, the files are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from corpora import stdlib_corpus


def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_heal.py"
    spec = importlib.util.spec_from_file_location("smollm2_heal", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smollm2_heal_script_runs_every_part_on_a_tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.data.corpus import minilm_tokenizer

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    corpus = str(stdlib_corpus(tmp_path))
    out = tmp_path / "out"
    code = _script().main([
        "--model", str(tmp_path / "llama"), "--out", str(out), "--device", "cpu", "--threads", "1",
        "--corpus", corpus, "--finetune-corpus", corpus, "--val-fraction", "0.25", "--eval-files", "2",
        "--eval-window", "32", "--max-files", "10", "--table-eval-files", "2", "--batch-size", "2", "--seq-len", "32",
        "--calib-samples", "8", "--calib-len", "32", "--heal-steps", "4", "--budget", "0.2", "--table-steps", "2",
        "--rank", "2", "--total-seconds", "1e9"])  # steps, not the clock, end every loop here
    assert code == 0
    files = sorted(p.suffix for p in out.iterdir())
    assert files == [".json", ".md", ".png"]
    res = json.loads(next(out.glob("*.json")).read_text())
    parts = res["parts"]
    assert set(parts) == {"compress", "heal", "table"}
    assert not any("errors" in p for p in parts.values()), {k: p.get("errors") for k, p in parts.items()}
    assert parts["compress"]["backend"] == "auto" and abs(parts["compress"]["params_fraction"] - 0.5) < 0.1
    heal = parts["heal"]
    assert heal["trainable_params"] == heal["adapter_params"] + heal["norm_params"] > heal["norm_params"] > 0
    assert heal["trainable_fraction_of_block_linear"] <= 0.2
    assert [c["step"] for c in heal["curve"]] == [0, 1, 2, 3, 4] and heal["steps_done"] == 4
    assert heal["eora_error"]["after"] < heal["eora_error"]["before"]
    rows = {r["method"]: r for r in parts["table"]["rows"]}
    assert list(rows) == ["lora", "pissa", "rslora", "kron", "randbasis", "ldu", "rows", "splr", "full"]
    assert all("error" not in r and r["steps_done"] == 2 and r["ppl"] > 1 for r in rows.values()), rows
    assert rows["full"]["trainable_params"] == res["model"]["params"]
    params = res["model"]["params"]  # AdamW: two float32 moments per parameter (+ a step counter per tensor)
    assert 8 * params <= rows["full"]["optimizer_state_bytes"] < 8 * params + 4096
    assert rows["lora"]["trainable_params"] == rows["pissa"]["trainable_params"] < res["model"]["params"] // 10


def test_training_stops_at_its_wall_clock_cap_and_says_so():
    script = _script()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))

    def loss(batch):
        return torch.nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, 16), batch[:, 1:].reshape(-1))

    run = script.train(model, loss, torch.randint(16, (256,)), steps=50, batch_size=2, seq_len=8, lr=1e-2,
                       device=torch.device("cpu"), autocast=False, max_seconds=0.0)
    assert run["steps_done"] == 0 and "cap" in run["stopped"]
    run = script.train(model, loss, torch.randint(16, (256,)), steps=5, batch_size=2, seq_len=8, lr=1e-2,
                       device=torch.device("cpu"), autocast=False, max_seconds=1e9)
    assert run["steps_done"] == 5 and run["stopped"] is None and run["optimizer_state_bytes"] > 0


def test_budget_capped_equals_the_solver_and_falls_back_to_low_rank_when_pricing_runs_out():
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.compress import DEFAULT_ALLOW, Compressor

    script = _script()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    batches = [{"input_ids": torch.randint(64, (4, 32))} for _ in range(2)]
    comp = Compressor(model, batches, script.BLOCK_LINEARS)
    done, pricing = script.budget_capped(comp, 0.5, DEFAULT_ALLOW, 1e9)
    assert pricing["fallback"] is None and pricing["priced_with_allow"] == len(comp.names) == 14
    assert pricing["allow_used"] == DEFAULT_ALLOW
    reference = comp.budget(0.5)
    assert {n: (str(c.spec), c.method) for n, c in done.chosen.items()} == \
        {n: (str(c.spec), c.method) for n, c in reference.chosen.items()}
    done, pricing = script.budget_capped(comp, 0.5, DEFAULT_ALLOW, 0.0)  # the cap is spent before any layer
    assert pricing["priced_with_allow"] == 0 and "lowrank@whitened" in pricing["fallback"]
    assert pricing["allow_used"] == script.FALLBACK_ALLOW
    assert set(done.mix()) <= {"lowrank@whitened"} and abs(done.report.params_fraction - 0.5) < 0.1


def test_smollm2_heal_heals_a_student_directory_written_by_compress(tmp_path):
    """--student DIR: the compressed model comes from a structmat directory (the budget solver's mix, saved), not
    from compressing in the script; the heal still calibrates the dense model for EoRA and the rank placement."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.compress import Compressor
    from structmat.data.corpus import minilm_tokenizer
    from structmat.io import save_pretrained

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    batches = [{"input_ids": torch.randint(tok.vocab_size, (4, 32))} for _ in range(2)]
    mixed = Compressor(model, batches, r".*layers\.\d+\..*").budget(0.5, "lowrank@whitened,nm@sparsegpt")
    save_pretrained(mixed.model, tmp_path / "mix50")
    corpus = str(stdlib_corpus(tmp_path))
    out = tmp_path / "out"
    code = _script().main([
        "--model", str(tmp_path / "llama"), "--student", str(tmp_path / "mix50"), "--parts", "compress,heal",
        "--out", str(out), "--device", "cpu", "--threads", "1", "--corpus", corpus, "--val-fraction", "0.25",
        "--eval-files", "2", "--eval-window", "32", "--max-files", "10", "--batch-size", "2", "--seq-len", "32",
        "--calib-samples", "8", "--calib-len", "32", "--heal-steps", "4", "--budget", "0.2",
        "--total-seconds", "1e9"])
    assert code == 0
    res = json.loads(next(out.glob("*.json")).read_text())
    comp, heal = res["parts"]["compress"], res["parts"]["heal"]
    assert "errors" not in comp and "errors" not in heal, (comp.get("errors"), heal.get("errors"))
    assert comp["student"] == str(tmp_path / "mix50") and sum(comp["mix"].values()) == 14  # layers kept dense count
    assert {k: v for k, v in comp["mix"].items() if k != "dense"} == {
        k.partition("@")[0]: v for k, v in mixed.mix().items()}
    assert abs(comp["params_fraction"] - mixed.report.params_fraction) < 1e-9 and comp["ppl"] > 1
    assert heal["steps_done"] == 4 and heal["trainable_fraction_of_block_linear"] <= 0.2
    assert heal["eora_error"]["after"] < heal["eora_error"]["before"]
    with pytest.raises(SystemExit, match="no structmat.json"):
        _script().main(["--model", str(tmp_path / "llama"), "--student", str(tmp_path), "--out", str(out)])


def test_the_table_alone_reads_no_stdlib_and_runs_every_row_the_same_steps(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.data.corpus import minilm_tokenizer

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    corpus = str(stdlib_corpus(tmp_path))
    out = tmp_path / "out"
    assert _script().main([
        "--model", str(tmp_path / "llama"), "--out", str(out), "--device", "cpu", "--threads", "1", "--parts",
        "table", "--methods", "full,lora", "--corpus", "/nonexistent-is-not-read", "--finetune-corpus", corpus,
        "--val-fraction", "0.25", "--max-files", "4", "--table-eval-files", "2", "--batch-size", "2", "--seq-len",
        "16", "--eval-window", "16", "--table-steps", "3", "--rank", "2", "--total-seconds", "1e9"]) == 0
    res = json.loads(next(out.glob("*.json")).read_text())
    assert "dense_ppl" not in res["model"] and "heal_train" not in res["data"]
    rows = res["parts"]["table"]["rows"]
    assert [r["method"] for r in rows] == ["full", "lora"] and all(r["steps_done"] == 3 for r in rows)
