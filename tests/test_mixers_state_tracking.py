"""The state-tracking suite: task generators are right, and the --smoke pipeline runs end to end on CPU."""

import json
import random

import torch

from structmat.bench.state_tracking import _eval_expr, _gen_bracket_expr, _group, main, make_batch


def test_task_labels():
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    x, y = make_batch("parity", 8, 13, gen, rng)
    assert (y[:, -1] == x.sum(1) % 2).all() and (y[:, :-1] == -100).all()
    x, y = make_batch("modarith", 4, 9, gen, rng)
    for row, lab in zip(x.tolist(), y[:, -1].tolist()):
        v = row[0]
        for op, d in zip(row[1::2], row[2::2]):
            v = {5: v + d, 6: v - d, 7: v * d}[op] % 5
        assert v == lab
    for n in (1, 3, 7, 41):
        e = _gen_bracket_expr(n, rng)
        assert len(e) == n and _eval_expr(e) == eval("".join(map(str, e))) % 5
    n, table = _group(3)
    x, y = make_batch("s3", 4, 10, gen, rng)
    assert n == 6 and (y[:, 0] == x[:, 0]).all() and (y[:, 5] == table[x[:, 5], y[:, 4]]).all()


def test_smoke_runs(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path), "--backend", "auto"]) == 0
    (path,) = tmp_path.glob("state-tracking-smoke-*.json")
    d = json.loads(path.read_text())
    assert d["protocol"]["smoke"] and all("error" not in r for r in d["runs"])
    assert d["protocol"]["backend"] == "auto"  # on the CPU auto runs the chunked form, and each run says so
    assert {tuple(r["backend_ran"] or ()) for r in d["runs"] if r["model"].startswith("delta")} == {("chunked",)}
    assert set(d["table_best_of_seeds_scaled_accuracy"]["ssm[-1,1]"]) == {"parity", "modarith", "modarith_brackets",
                                                                           "s3", "s5"}
