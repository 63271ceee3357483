"""The exact reference: a multiple-choice knapsack solved by HiGHS through `scipy.optimize.milp`.

Every MoE layer l takes exactly one choice c (one-hot x[l, c]). With the closed-form cost model's
additive structure — seconds per decode step = fixed + sum_l t[l, c_l] — maximizing tokens/s is
minimizing sum t[l, c] x[l, c], linear in x. The accuracy constraint of `planner.accuracy` is not
linear: g(M, V) = alpha*M + z*sqrt(alpha^2*V + se^2*M^2) <= B with M = sum mu x and V = sum var x.
For a fixed variance cap V, though, g(., V) is convex in M, so {M : g(M, V) <= B} is an interval
[M_lo(V), M_hi(V)] and the problem "sum var x <= V, M_lo <= sum mu x <= M_hi" is a linear MILP
whose solutions are all truly feasible (g grows with V).

The true optimum is certified by branch and bound over V. With alpha > z*se, the largest
feasible mean M_hi(V) is a convex, decreasing function of V (the inverse of the decreasing branch
of a convex quadratic), so on an interval [Va, Vb] the chord through (Va, M_hi(Va)) and
(Vb, M_hi(Vb)) lies above it: "Va <= sum var x <= Vb, sum mu x <= chord(sum var x)" is linear
and contains every truly feasible x whose variance lies in [Va, Vb] (otherwise the constant
M_hi(Va) is used). If the relaxation's solution is truly feasible, the interval's bound is reached
and the interval is closed; otherwise the interval is split at that solution's variance V*, into
[Va, V* - eps] and [V*, Vb], which both exclude it — so the search ends after finitely many MILPs
with the exact optimum (to `rel_tol` and the variance resolution `eps`, 1e-5 of the largest
variance sum, above HiGHS's 1e-6 feasibility tolerance). Intervals are taken best bound first
and dropped once their bound cannot beat the incumbent. This is the bisection over the variance
cap that issue 6 asks for, with a bound on each interval.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from planner.accuracy import Constraint
from profiles.errors import PlanError


@dataclass(frozen=True)
class MilpResult:
    """The certified optimum of the additive problem.

    Attributes:
        choice: chosen option index per layer, shape [L].
        cost: sum_l cost[l, choice[l]] (seconds per decode step of the expert phases).
        M, V: sum of the chosen means and variances.
        certified: the bound search closed (optimal within `gap`); False when `max_solves` ran out.
        gap: relative gap between the best remaining bound and the incumbent (0 when closed).
        solves: MILPs solved.
        wall_s: measured wall time of the search.
    """

    choice: np.ndarray
    cost: float
    M: float
    V: float
    certified: bool
    gap: float
    solves: int
    wall_s: float


@contextlib.contextmanager
def _quiet_stdout():
    """Silence HiGHS's occasional debug lines, which it writes to file descriptor 1 directly."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _solve(cost: np.ndarray, rows: list[np.ndarray], lo: list[float], hi: list[float],
           avail: np.ndarray, nudge: float) -> np.ndarray | None:
    """One MILP: min cost.x with one choice per layer and lo[i] <= rows[i].x <= hi[i].

    `rows[0]` is the variance row; its upper bound may be nudged by `nudge` on a solver error.
    """
    L, C = cost.shape
    idx = np.flatnonzero(avail.ravel())
    onehot = np.zeros((L, idx.size))
    onehot[idx // C, np.arange(idx.size)] = 1.0
    A = np.vstack([onehot] + [r.ravel()[idx][None, :] for r in rows])
    lo_all = np.concatenate([np.ones(L), lo])
    hi_all = np.concatenate([np.ones(L), hi])
    # HiGHS can fail ("solve error") when a bound sits within its 1e-6 integrality tolerance of
    # an attainable value; retry without presolve, then with the variance cap nudged inside the
    # resolution (which the caller's interval splitting tolerates)
    for presolve, shift in ((True, 0.0), (False, 0.0), (True, nudge), (False, -nudge)):
        hi_try = hi_all.copy()
        hi_try[L] -= shift
        with _quiet_stdout():
            res = milp(cost.ravel()[idx], constraints=LinearConstraint(A, lo_all, hi_try),
                       integrality=np.ones(idx.size), bounds=Bounds(0, 1),
                       options={"mip_rel_gap": 1e-9, "presolve": presolve})
        if res.status != 4:  # 4: solver error
            break
    if res.status == 4:
        raise PlanError(f"HiGHS failed on the knapsack ({res.message}); report this with the "
                        f"profile")
    if res.x is None:
        return None
    x = np.zeros(L * C)
    x[idx] = np.round(res.x)
    return x.reshape(L, C).argmax(axis=1)


def m_upper(constraint: Constraint, V: float) -> float | None:
    """The largest M with g(M, V) <= budget when alpha > z*se (then it is a convex, decreasing
    function of V: the inverse of the decreasing branch of a convex quadratic); else None."""
    a, k, B, z = constraint.alpha, (constraint.z * constraint.alpha_se) ** 2, constraint.budget, \
        constraint.z
    if a <= 0 or a * a <= k:
        return None
    disc = k * B * B + (a * a - k) * z * z * a * a * V
    return (a * B - math.sqrt(max(disc, 0.0))) / (a * a - k)


def solve_knapsack(cost: np.ndarray, mu: np.ndarray, var: np.ndarray, constraint: Constraint, *,
                   available: np.ndarray | None = None, rel_tol: float = 1e-9,
                   max_solves: int = 400) -> MilpResult | None:
    """Minimize sum cost[l, c_l] subject to constraint.g(sum mu, sum var) <= budget, exactly.

    Args:
        cost: [L, C] cost of each choice (seconds per step); NaN or inf = not available.
        mu: [L, C] mean drop of each choice.
        var: [L, C] variance of each choice's drop (>= 0).
        constraint: the accuracy constraint (budget, z, additivity correction).
        available: [L, C] mask of allowed choices (default: finite cost, mu and var).
        rel_tol: relative optimality tolerance of the bound search.
        max_solves: cap on MILPs; when reached the result is not certified and says its gap.

    Returns:
        The optimum, or None when no assignment satisfies the constraint.
    """
    t0 = time.perf_counter()
    cost, mu, var = (np.asarray(a, dtype=float) for a in (cost, mu, var))
    avail = np.isfinite(cost) & np.isfinite(mu) & np.isfinite(var)
    if available is not None:
        avail &= np.asarray(available, bool)
    if not avail.any(axis=1).all():
        return None
    cost, mu, var = (np.where(avail, a, 0.0) for a in (cost, mu, var))
    var = np.maximum(var, 0.0)
    # scale so that HiGHS's absolute tolerances (1e-6 .. 1e-9) are small against the data
    cs = max(float(np.abs(cost[avail]).max()), 1e-300)
    vs = max(float(var[avail].max()), 1e-30)
    ms = max(float(np.abs(mu[avail]).max()), abs(constraint.budget), 1e-12)
    c_n, v_n, m_n = cost / cs, var / vs, mu / ms
    v_min = float(np.where(avail, v_n, np.inf).min(axis=1).sum())
    v_max = float(np.where(avail, v_n, -np.inf).max(axis=1).sum())
    m_min = float(np.where(avail, m_n, np.inf).min(axis=1).sum())
    m_max = float(np.where(avail, m_n, -np.inf).max(axis=1).sum())
    eps = 1e-5 * max(v_max, 1e-12)  # variance resolution, above HiGHS's 1e-6 tolerance
    pad = 1e-9 * max(abs(m_min), abs(m_max), 1.0)

    def relaxation(va: float, vb: float):
        """Rows and bounds whose solutions include every feasible x with V in [va, vb]."""
        mr = constraint.m_interval(va * vs, m_min * ms, m_max * ms)
        if mr is None:
            return None
        rows, lo, hi = [v_n], [va], [vb]
        up_a, up_b = m_upper(constraint, va * vs), m_upper(constraint, vb * vs)
        if up_a is not None and vb > va:  # chord above the convex M_hi(V): an outer bound
            slope = (up_b - up_a) / ms / (vb - va)
            rows.append(m_n - slope * v_n)
            lo.append(-np.inf)
            hi.append(up_a / ms - slope * va + pad)
        rows.append(m_n)
        lo.append(mr[0] / ms - pad)
        hi.append(mr[1] / ms + pad)
        return rows, lo, hi

    def evaluate(ch) -> tuple[bool, float, float, float]:
        r = np.arange(len(ch))
        M = float(mu[r, ch].sum())
        V = float(var[r, ch].sum())
        return constraint.feasible(M, V, tol=1e-9), float(cost[r, ch].sum()), M, V

    best = None  # (cost, choice, M, V)
    solves = 0
    counter = itertools.count()
    heap = [(-np.inf, next(counter), v_min, v_max)]
    while heap:
        bound, _, va, vb = heapq.heappop(heap)
        if best is not None and bound >= best[0] - rel_tol * abs(best[0]):
            continue
        if solves >= max_solves:
            heapq.heappush(heap, (bound, next(counter), va, vb))
            break
        rel = relaxation(va, vb)
        if rel is None:
            continue
        ch = _solve(c_n, *rel, avail, eps / 4)
        solves += 1
        if ch is None:
            continue
        ok, c_val, M, V = evaluate(ch)
        if ok:
            if best is None or c_val < best[0]:
                best = (c_val, ch, M, V)
            continue
        if (best is not None and c_val >= best[0] - rel_tol * abs(best[0])) or vb - va <= eps:
            continue  # cannot improve, or below the variance resolution
        v_star = min(max(V / vs, va), vb)  # HiGHS may overshoot a bound by its tolerance
        if v_star - eps >= va:
            heapq.heappush(heap, (c_val, next(counter), va, v_star - eps))
        heapq.heappush(heap, (c_val, next(counter), v_star if v_star > va else va + eps, vb))
    if best is None:
        return None
    gap = 0.0
    if heap:
        lowest = min(b for b, *_ in heap)
        gap = max(0.0, (best[0] - lowest) / max(abs(best[0]), 1e-300))
    return MilpResult(best[1], best[0], best[2], best[3], gap <= rel_tol, gap, solves,
                      time.perf_counter() - t0)


def brute_force(cost: np.ndarray, mu: np.ndarray, var: np.ndarray, constraint: Constraint
                ) -> tuple[float, np.ndarray] | None:
    """Enumerate every assignment (tests and tiny instances only): (min cost, choice) or None."""
    cost, mu, var = (np.asarray(a, dtype=float) for a in (cost, mu, var))
    L, C = cost.shape
    best = None
    for ch in itertools.product(range(C), repeat=L):
        ch = np.asarray(ch)
        rows = np.arange(L)
        c = cost[rows, ch]
        if not np.all(np.isfinite(c)):
            continue
        if constraint.feasible(float(mu[rows, ch].sum()), float(var[rows, ch].sum()), tol=1e-9):
            total = float(c.sum())
            if best is None or total < best[0]:
                best = (total, ch)
    return best
