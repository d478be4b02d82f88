"""benchmarks/compress_gpu.py (the lead's one-command GPU run) on tiny sizes on the CPU, so it cannot crash on
the device for a reason a CPU could have shown."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compress_gpu", ROOT / "benchmarks" / "compress_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compress_gpu"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.data.corpus import minilm_tokenizer

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_llama_1b_path_reports_every_stage_of_every_block(bench, tmp_path):
    record = bench.llama_1b(tmp_path, 16, 32, 0.5, tiny=True, device="cpu")
    assert record["layers"] == 14 and record["params_fraction"] < 0.6
    stages = [(r["stage"], r["block"]) for r in record["stage_records"]]
    per_block = ["onload", "calibrate", "project", "propagate", "offload"]
    assert stages == [("inputs", -1)] + [(s, b) for b in range(2) for s in per_block]
    terms = record["terms_bytes"]  # every term of the bound, from the shapes (the working sets need CUDA)
    assert terms["block_kwargs"] > 0 and terms["one_compressed_block"] < terms["one_block"]
    assert terms["activations"] == 16 * 32 * 64 * 2 and terms["one_block_stats"] == (3 * 64 * 64 + 256 * 256 + 3 * 64
                                                                                      + 256) * 4
    resident = record["resident_by_stage_bytes"]
    assert set(resident) == {"inputs", *per_block}
    assert record["bound_bytes"] == max(resident.values()) == resident["project"]
    assert record["resident_between_blocks_bytes"] == terms["activations"] + terms["block_kwargs"]  # no weights


def test_llama_1b_offload_all_path_reports_its_bound(bench, tmp_path):
    record = bench.llama_1b(tmp_path, 16, 32, 0.5, tiny=True, device="cpu", offload="all")
    assert record["layers"] == 14 and record["params_fraction"] < 0.6 and "offload='all'" in record["plan"]
    stages = [(r["stage"], r["block"]) for r in record["stage_records"]]
    assert stages == [("inputs", -1)] + [(s, b) for b in range(2)
                                         for s in ("onload", "calibrate", "project", "propagate", "offload")]
    terms = record["terms_bytes"]
    assert record["one_block_plus_activations_bytes"] == terms["one_block"] + terms["activations"]


def test_table_on_a_tiny_llama_folder(bench, tiny_folder, tmp_path):
    record = bench.smollm2_table(tiny_folder, tmp_path, "X", 8, 32, 1, 64, 512, "cpu", tmp_path / "rows.jsonl",
                                 table_rows="whitened SVD@0.5,N:M SparseGPT@0.5,N:M SparseGPT@0.5:sequential")
    assert [(r["method"], r["mode"]) for r in record["rows"]] == [
        ("whitened SVD", "one-shot"), ("N:M SparseGPT", "one-shot"), ("N:M SparseGPT", "sequential")]
    assert record["dense"]["ppl"] > 1 and all(r["ppl"] > 1 for r in record["rows"])
    assert record["checks"]["best_single_method_at_50"] in ("whitened SVD", "N:M SparseGPT")
    assert isinstance(record["checks"]["sparsegpt_sequential_no_worse_than_one_shot"], bool)
    assert Path(record["png"]).read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "dense" in json.loads(lines[0])  # dense + one line per finished row


def test_budget_stage_runs_the_cli_and_reads_its_json(bench, tiny_folder, tmp_path):
    record = bench.budget(tiny_folder, tmp_path, 8, 32, "cpu", 300,
                          ["--allow", "lowrank@whitened", "--no-eval"])
    assert record["returncode"] == 0, record.get("stderr_tail")
    assert [r["target"] for r in record["rows"]] == [0.25, 0.5, 0.75]
    assert all(r["mix"] == {"lowrank@whitened": 14} or sum(r["mix"].values()) <= 14 for r in record["rows"])
    stages = record["stages_s"]  # every stage line, per-target stages once per target
    assert {"loaded", "tokenized", "calibrated", "priced", "solved", "projected", "saved"} <= set(stages), stages
    assert len(stages["priced"]) == 1 and len(stages["projected"]) == 3 and "evaluated" not in stages
    assert all(r["ppl"] is None for r in record["rows"])


def test_convert_joins_gguf_parts_in_order(bench, tmp_path, monkeypatch):
    import structmat.data.smollm2 as smollm2

    seen = {}
    monkeypatch.setattr(smollm2, "convert_gguf", lambda source, target: seen.update(
        data=Path(source).read_bytes(), target=target))
    parts = []
    for i, chunk in enumerate([b"GGUF-head", b"-middle", b"-tail"]):
        parts.append(tmp_path / f"model.part{i}")
        parts[-1].write_bytes(chunk)
    record = bench.convert([str(p) for p in parts], tmp_path / "work" / "smollm2")
    assert seen["data"] == b"GGUF-head-middle-tail" and record["gguf_bytes"] == len(seen["data"])


def test_convert_gguf_names_a_missing_file(tmp_path):
    from structmat.data.smollm2 import convert_gguf

    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_driver_refuses_cuda_without_a_gpu(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main(["--stages", "llama1b"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_default_table_rows_put_the_must_show_rows_first(bench):
    rows = bench.parse_table_rows(bench.TABLE_ROWS)
    assert rows[0] == ("budget mix", 0.5, "one-shot")
    must = {("N:M SparseGPT", 0.5, "sequential"), ("budget mix", 0.5, "sequential"), ("budget mix", 0.25, "one-shot"),
            ("budget mix", 0.75, "one-shot")}
    singles = {r for r in rows if r[0] != "budget mix" and r[2] == "one-shot" and r[1] == 0.5}
    assert must <= set(rows) and {r[0] for r in singles} >= {"whitened SVD", "SVD", "ASVD", "whitened Monarch",
                                                           "block-diagonal", "N:M SparseGPT", "N:M Wanda"}
    with pytest.raises(SystemExit, match="label@target"):
        bench.parse_table_rows("wanda@0.5")
