"""The budget solver against brute force, and its guarantees (never over budget, never larger than dense)."""

from __future__ import annotations

import itertools
import random

import pytest

from structmat.project.budget_solver import Candidate, solve_budget


def random_problem(rng: random.Random, layers: int, options: int):
    problem = {}
    for li in range(layers):
        dense = rng.randint(50, 200)
        cands = [Candidate(f"l{li}", "dense", "none", dense, 2 * dense, 0.0, dense)]
        for _ in range(options - 1):
            params = rng.randint(1, dense)
            cands.append(Candidate(f"l{li}", f"s{params}", "m", params, 2 * params, rng.random() * (1 - params / dense),
                                   dense))
        problem[f"l{li}"] = cands
    return problem


def brute_force(problem, budget):
    best = None
    for combo in itertools.product(*problem.values()):
        cost = sum(c.params for c in combo)
        err = sum(c.error for c in combo)
        if cost <= budget and (best is None or err < best[0]):
            best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_when_costs_sit_on_the_grid(seed):
    rng = random.Random(seed)
    problem = random_problem(rng, layers=4, options=4)
    total_dense = sum(p[0].params for p in problem.values())
    budget = int(total_dense * rng.uniform(0.4, 0.8))
    chosen = solve_budget(problem, budget, units=budget)  # one unit per parameter: exact
    err = sum(c.error for c in chosen.values())
    assert sum(c.params for c in chosen.values()) <= budget
    assert err == pytest.approx(brute_force(problem, budget)[0], abs=1e-12)


def test_default_grid_is_near_optimal_and_uses_the_budget():
    rng = random.Random(0)
    problem = {}
    for li in range(30):  # many fine-grained sizes, like ranks in multiples of 8
        dense = 10_000
        problem[f"l{li}"] = [Candidate(f"l{li}", f"r{k}", "m", k * 250, k * 500, (1 - k / 40) ** 2 * rng.uniform(.5, 2),
                                       dense) for k in range(0, 40)]
    budget = 0.5 * 30 * 10_000
    chosen = solve_budget(problem, budget)
    used = sum(c.params for c in chosen.values())
    assert budget * 0.99 <= used <= budget


def test_errors_are_clear():
    c = Candidate("a", "x", "m", 20, 40, 0.1, 10)
    with pytest.raises(ValueError, match="layer a: candidate x has 20 params > dense 10"):
        solve_budget({"a": [c]}, 100)
    ok = Candidate("a", "x", "m", 5, 10, 0.1, 10)
    with pytest.raises(ValueError, match="below the cheapest choice"):
        solve_budget({"a": [ok]}, 4)
    with pytest.raises(ValueError, match="no candidate structure fits"):
        solve_budget({"a": []}, 4)
    with pytest.raises(ValueError, match="'params' or 'flops'"):
        solve_budget({"a": [ok]}, 4, key="bytes")
