"""The exact knapsack: HiGHS with the variance-cap bound search equals brute force."""

from __future__ import annotations

import numpy as np
import pytest

from planner.accuracy import Constraint
from planner.milp import brute_force, m_upper, solve_knapsack


def instance(rng, L, C, gains=True):
    cost = rng.uniform(1.0, 10.0, (L, C))
    mu = rng.normal(0.01, 0.01 if gains else 0.004, (L, C))
    if not gains:
        mu = np.abs(mu)
    var = rng.uniform(0.0, 1e-4, (L, C))
    cost[:, 0], mu[:, 0], var[:, 0] = 10.0, 0.0, 0.0  # raw: slow, exact
    return cost, mu, var


@pytest.mark.parametrize("seed", range(12))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    L, C = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    cost, mu, var = instance(rng, L, C)
    if seed % 3 == 0:  # an unavailable choice
        cost[rng.integers(L), rng.integers(1, C)] = np.inf
    con = Constraint(float(rng.uniform(0.0, 0.05)), 1.645, float(rng.uniform(0.8, 1.3)),
                     float(rng.uniform(0.0, 0.3)))
    res = solve_knapsack(cost, mu, var, con)
    ref = brute_force(cost, mu, var, con)
    assert res is not None and ref is not None
    assert res.cost == pytest.approx(ref[0], rel=1e-9)
    assert res.certified and res.gap == 0.0
    rows = np.arange(L)
    assert con.feasible(mu[rows, res.choice].sum(), var[rows, res.choice].sum(), tol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_milp_equals_brute_force_when_the_correction_is_uncertain(seed):
    # z * se > alpha: no chord (M_hi(V) is not convex there); the constant bound is used
    rng = np.random.default_rng(100 + seed)
    cost, mu, var = instance(rng, 4, 3)
    con = Constraint(0.02, 2.0, 0.5, 0.4)
    assert m_upper(con, 0.0) is None
    res = solve_knapsack(cost, mu, var, con)
    ref = brute_force(cost, mu, var, con)
    assert res.cost == pytest.approx(ref[0], rel=1e-9)


def test_infeasible_without_an_exact_choice():
    cost = np.array([[1.0, 2.0], [1.0, 2.0]])
    mu = np.array([[0.05, 0.04], [0.05, 0.04]])
    var = np.zeros((2, 2))
    assert solve_knapsack(cost, mu, var, Constraint(0.01)) is None
    assert brute_force(cost, mu, var, Constraint(0.01)) is None


def test_larger_instance_is_certified_and_feasible():
    rng = np.random.default_rng(7)
    L, C = 20, 6
    cost = np.sort(rng.uniform(1, 10, (L, C)), axis=1)[:, ::-1].copy()
    mu = np.sort(np.abs(rng.normal(0.002, 0.003, (L, C))), axis=1)
    var = np.sort(rng.uniform(0, 1e-5, (L, C)), axis=1)
    mu[:, 0] = var[:, 0] = 0.0
    con = Constraint(0.02, 1.645, 1.05, 0.1)
    res = solve_knapsack(cost, mu, var, con)
    assert res.certified
    assert con.g(res.M, res.V) <= 0.02 * (1 + 1e-9)
    # no single-layer change of the optimum is both feasible and cheaper
    rows = np.arange(L)
    for layer in range(L):
        for c in range(C):
            ch = res.choice.copy()
            ch[layer] = c
            if con.feasible(mu[rows, ch].sum(), var[rows, ch].sum(), tol=1e-9):
                assert cost[rows, ch].sum() >= res.cost - 1e-9


def test_all_zero_means_and_negative_costs():
    # a profile where nothing measurably changes, and marginal (negative) costs of a linearization
    cost = np.array([[0.0, -1e-4, -2e-4], [0.0, 3e-5, -1e-5], [0.0, np.nan, np.nan]])
    mu = np.where(np.isnan(cost), np.nan, 0.0)
    var = np.array([[0.0, 0.004, 0.004], [0.0, 0.004, 0.004], [0.0, np.nan, np.nan]])
    con = Constraint(0.2)
    res = solve_knapsack(cost, mu, var, con)
    ref = brute_force(np.nan_to_num(cost, nan=np.inf), np.nan_to_num(mu), np.nan_to_num(var), con)
    assert res.cost == pytest.approx(ref[0]) and res.certified
