"""The main job on the real packaged MiniLM weights (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from structmat.cli import main
from structmat.data.pretrained import load_minilm


def test_table_projects_real_minilm_weights_and_writes_json(tmp_path, capsys):
    rc = main(["table", "--structures", "dense,lowrank,monarch,nm", "--tokens", "8", "--repeats", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| attention.query  | lowrank (SVD)" in printed and "| mlp.intermediate | monarch" in printed
    result = json.loads((tmp_path / "table.json").read_text())
    rows = {(r["weight"], r["structure"]): r for r in result["metrics"]}
    assert result["run_info"]["torch"] == torch.__version__
    # The low-rank error on the real weight equals Eckart-Young computed independently here.
    w = load_minilm().encoder.layer[0].attention.self.query.weight.detach().double().numpy()
    row = rows[("attention.query", "lowrank (SVD)")]
    rank = int(row["spec"].split("=")[1])
    s = np.linalg.svd(w, compute_uv=False)
    assert abs(row["rel_error"] - np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum())) < 1e-5
    for (_, structure), r in rows.items():
        if structure != "dense":
            assert 0.45 < r["params_frac"] <= 0.51 and 0 < r["rel_error"] < 1
    assert rows[("mlp.intermediate", "dense")]["rel_error"] == 0


def test_table_rejects_unknown_structures_and_bad_ratio(capsys):
    assert main(["table", "--structures", "butterfly"]) == 2
    assert "unknown structure(s) ['butterfly']" in capsys.readouterr().err
    assert main(["table", "--ratio", "1.5"]) == 2


def test_demo_sweep_small_run_orders_methods_as_expected(tmp_path, capsys):
    rc = main(["demo", "--methods", "SVD,whitened SVD", "--targets", "0.5", "--calib-texts", "32",
               "--eval-texts", "48", "--max-length", "64", "--out", str(tmp_path)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "demo.json").read_text())["metrics"]}
    assert rows["whitened SVD"]["cosine"] > rows["SVD"]["cosine"]
    assert (tmp_path / "demo_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| whitened SVD" in capsys.readouterr().out


def test_compress_and_eval_a_local_causal_lm_directory(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.data.corpus import minilm_tokenizer

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    src = tmp_path / "base"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "small"
    assert main(["compress", "--model", str(src), "--target-params", "0.5", "0.75", "--structure",
                 "lowrank@whitened", "--calib-samples", "8", "--seq-len", "32", "--sequential", "--eval-files", "2",
                 "--eval-window", "64", "--out", str(out)]) == 0
    results = json.loads((out / "compress.json").read_text())["results"]
    assert [len(r["report"]["layers"]) for r in results] == [14, 14]  # 2 blocks x (q, k, v, o, gate, up, down)
    assert results[0]["params_fraction"] < results[1]["params_fraction"] < 1
    assert all(r["quality"]["ppl"] > 1 for r in results)
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    lean = tmp_path / "lean"  # --offload all: activations and statistics on the host, the same compression
    assert main(["compress", "--model", str(src), "--target-params", "0.5", "--structure", "lowrank@whitened",
                 "--calib-samples", "8", "--seq-len", "32", "--sequential", "--offload", "all", "--device", "cpu",
                 "--no-eval", "--out", str(lean)]) == 0
    leaned = json.loads((lean / "compress.json").read_text())["results"][0]
    assert leaned["params_fraction"] == results[0]["params_fraction"]
    assert [r["output_error"] for r in leaned["report"]["layers"]] == pytest.approx(
        [r["output_error"] for r in results[0]["report"]["layers"]], rel=1e-3)
    out = out / "target-0.50"
    assert (out / "structmat.json").is_file()
    assert (out / "tokenizer_config.json").is_file()  # saved beside the model: generate needs no --tokenizer
    assert main(["generate", "--model", str(out), "--max-new-tokens", "3", "--rounds", "1"]) == 0
    assert main(["eval", "--model", str(out), "--tokenizer", str(src), "--files", "2", "--seq-len", "64",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert metrics["ppl"] > 1 and metrics["windows"] >= 1

    # without --tokenizer, eval takes the folder's own (compress saved it), never a default of another model's
    def ppl(*extra):
        assert main(["eval", "--model", str(out), "--files", "2", "--seq-len", "64", "--out", str(out), *extra]) == 0
        return json.loads((out / "eval.json").read_text())["metrics"]["ppl"]

    assert ppl() == ppl("--tokenizer", "minilm") == metrics["ppl"]  # (the folder's tokenizer is MiniLM's)
    assert main(["eval", "--model", str(out), "--files", "2", "--seq-len", "64", "--tokens", "200", "--out",
                 str(out)]) == 0
    capped = json.loads((out / "eval.json").read_text())["metrics"]
    assert capped["stream_tokens"] == 200 and capped["windows"] == 3
    assert main(["eval", "--model", str(out), "--seq-len", "64", "--tokens", "10", "--out", str(out)]) == 1
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "[SEP]": 1, "def": 2, "return": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(out)
    assert ppl() != metrics["ppl"]  # the folder's (now another) tokenizer
