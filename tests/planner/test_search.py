"""The Optuna search over the choice table of a small synthetic profile."""

from __future__ import annotations

import numpy as np
import pytest

from planner.accuracy import AccuracyModel
from planner.choices import build_table
from planner.milp import solve_knapsack
from planner.modelprofile import load_profile
from planner.search import PlanSearch, allocate_slots, run_search
from profiles.errors import ConfigError
from profiles.hardware import load_hardware
from profiles.serving import ServingConfig
from tests.planner.planner_fixtures import tiny_profile


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sim.closed_form import ClosedFormModel

    prof = load_profile(tiny_profile(tmp_path_factory.mktemp("prof"), layers=6))
    acc = AccuracyModel(prof.sensitivity, "content")
    hw = load_hardware("preset:h200-published")
    serving = ServingConfig(gpu_mem_fraction=0.25)
    cf = ClosedFormModel(hw, prof.geometry, serving, prof.traces)
    table = build_table(accuracy=acc, geometry=prof.geometry, ratios=prof.ratios, hardware=hw,
                        serving=serving, closed_form=cf, codecs=["szp"])
    return prof, acc, cf, table, acc.constraint(0.01)


def test_table_is_additive_in_the_closed_form(setup):
    _, _, cf, table, _ = setup
    assert table.separable
    rng = np.random.default_rng(0)
    choices = np.array([[rng.choice(table.options(p)) for p in range(len(table.moe_layers))]
                        for _ in range(5)])
    rows = np.arange(len(table.moe_layers))
    additive = cf.fixed_s + table.layer_s[rows, choices].sum(axis=1)
    assert np.allclose(cf.step_s_many(*table.inputs(choices)), additive, rtol=1e-9)


def test_search_is_deterministic_and_feasible(setup):
    _, acc, cf, table, con = setup
    milp = solve_knapsack(table.layer_s, table.mu, table.var, con)
    milp_tps = float(cf.tokens_per_s_many(*table.inputs(milp.choice))[0])
    for space in ("auto", "lagrangian", "per-layer"):
        runs = []
        for _ in range(2):
            s = PlanSearch(table, cf, con, acc, seed=3, space=space)
            runs.append(run_search(s, 40))
        a, b = runs
        np.testing.assert_array_equal(a.best_so_far, b.best_so_far)  # NaN before a feasible one
        assert a.best.choice == b.best.choice
        assert con.feasible(a.best.M, a.best.V)
        assert a.best.tokens_per_s <= milp_tps * (1 + 1e-9)  # the MILP is the optimum


def test_auto_space_picks_per_layer_for_small_tables(setup):
    from planner.search import AUTO_PER_LAYER_MAX, resolve_space

    table = setup[3]
    n = int(np.prod([len(table.options(p)) for p in range(len(table.moe_layers))]))
    space, note = resolve_space("auto", table)
    assert space == ("per-layer" if n <= AUTO_PER_LAYER_MAX else "lagrangian")
    assert f"{n:.3g} assignments" in note
    assert resolve_space("lagrangian", table) == ("lagrangian", "")


def test_warm_start_enqueues_the_milp_optimum(setup):
    _, acc, cf, table, con = setup
    milp = solve_knapsack(table.layer_s, table.mu, table.var, con)
    for space in ("lagrangian", "per-layer"):
        s = PlanSearch(table, cf, con, acc, seed=0, space=space)
        s.optimize(1, enqueue=[milp.choice])
        res = s.result()
        assert res.best.choice == tuple(int(c) for c in milp.choice)
        s.optimize(0, enqueue=[milp.choice])  # enqueued once only
        assert len(s.study.get_trials()) == 1


def test_nsga2_returns_a_feasible_pareto_front(setup):
    _, acc, cf, table, con = setup
    s = PlanSearch(table, cf, con, acc, sampler="nsga2", seed=0)
    res = run_search(s, 30)
    assert res.pareto and all(c.feasible for c in res.pareto)
    for c in res.pareto:  # no front point dominates another
        for d in res.pareto:
            if c is d:
                continue
            assert not (d.tokens_per_s > c.tokens_per_s and d.host_bytes < c.host_bytes
                        and acc.predict_sums(d.M, d.V).drop < acc.predict_sums(c.M, c.V).drop)


def test_storage_resumes_a_study(setup, tmp_path):
    _, acc, cf, table, con = setup
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    run_search(PlanSearch(table, cf, con, acc, storage=url, study_name="s"), 6)
    again = PlanSearch(table, cf, con, acc, storage=url, study_name="s")
    assert again.completed() == 6
    res = run_search(again, 9)
    assert res.trials == 9


def test_cache_allocation_searches_per_layer_slots(setup):
    _, acc, cf, table, con = setup
    s = PlanSearch(table, cf, con, acc, cache_allocation=True, seed=0)
    res = run_search(s, 8)
    slots = res.best.per_layer_cache_slots
    assert slots is not None and sum(slots) == min(s.total_slots(), 6 * 8)


def test_allocate_slots():
    assert allocate_slots(np.array([1.0, 1.0, 2.0]), 8, 8) == (2, 2, 4)
    assert allocate_slots(np.array([0.0, 0.0, 1.0]), 12, 8) == (2, 2, 8)
    assert sum(allocate_slots(np.array([0.3, 0.2, 0.5]), 7, 4)) == 7
    assert allocate_slots(np.zeros(2), 3, 4) in ((2, 1), (1, 2))


def test_bad_options(setup):
    _, acc, cf, table, con = setup
    with pytest.raises(ConfigError, match="sampler"):
        PlanSearch(table, cf, con, acc, sampler="cmaes")
    with pytest.raises(ConfigError, match="space"):
        PlanSearch(table, cf, con, acc, space="grid")
