"""The state-tracking suite: task generators are right, and the --smoke pipeline runs end to end on CPU."""

import json
import random

import torch

from structmat.bench import state_tracking
from structmat.bench.state_tracking import PRESETS, _eval_expr, _gen_bracket_expr, _group, lr_factor, main, make_batch


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


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0.0, 0.1, 1e-3) < 0.01 and abs(lr_factor(0.05, 0.1, 1e-3) - 0.5) < 1e-9
    assert lr_factor(0.1, 0.1, 1e-3) == 1.0 and abs(lr_factor(1.0, 0.1, 1e-3) - 1e-3) < 1e-12
    vals = [lr_factor(x / 100, 0.1, 1e-3) for x in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone after warmup
    assert lr_factor(2.0, 0.1, 0.0) == 0.0  # past the budget: the floor


def test_preset_fills_what_flags_leave_open(tmp_path):
    assert PRESETS["grazzi2025"]["steps"] == 100_000 and PRESETS["grazzi2025"]["batch"] == 256
    assert main(["--smoke", "--preset", "grazzi2025", "--weight-decay", "0.05", "--tasks", "parity",
                 "--models", "deltanet[-1,1]", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("state-tracking-smoke-*.json")
    proto = json.loads(path.read_text())["protocol"]
    assert proto["preset"] == "grazzi2025" and proto["weight_decay"] == 0.05  # the flag wins
    assert proto["warmup_frac"] == 0.1 and proto["min_lr_frac"] == 1e-3 and proto["model"]["n_heads"] == 4
    assert proto["published_budget"]["steps"] == 100_000


def test_kernel_warm_up_runs_each_delta_shape_once(monkeypatch):
    seen = []
    monkeypatch.setattr(state_tracking, "run_one", lambda job: seen.append((job["model"], job["steps"])) or {})
    jobs = [dict(model=m, task=t, seed=s, test_lengths=[40, 256]) for t in ("parity", "s3") for s in (0, 1)
            for m in ("deltanet[0,1]", "deltanet[-1,1]", "deltaproduct2[-1,1]", "ssm[-1,1]")]
    state_tracking.warm_kernel_caches(jobs)
    assert seen == [("deltanet[0,1]", 1), ("deltaproduct2[-1,1]", 1)]  # n_h = 1 and 2 once each, no SSM


def test_an_unavailable_device_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """--device cuda on a machine without it: exit status 2 and one line naming the device (it ended in torch's
    AssertionError traceback), nothing written."""
    import pytest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["--smoke", "--device", "cuda:7" if torch.cuda.is_available() else "cuda", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "is not available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
