"""The main job on the real packaged MiniLM weights (no network)."""

from __future__ import annotations

import json

import numpy as np
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
