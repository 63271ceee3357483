"""Plan plots (matplotlib, Agg): the Pareto front, the level per layer, throughput against budget.

Every figure is of predictions (closed form unless labelled simulation); titles say so.
`write_plots` draws all three for a `planner.pipeline.PlanOutcome`; the budget sweep re-solves
the knapsack (`planner.milp`) at budgets around the plan's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from profiles.fileio import atomic_write_with


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    _plt().close(fig)
    return path


def plot_pareto(path: str | Path, trials: Sequence[tuple[float, float, bool]],
                baselines: Sequence[tuple[str, float, float]], plan: tuple[float, float],
                budget: float, metric: str, title: str) -> Path:
    """Trials as (predicted drop, tokens/s, feasible), the feasible Pareto front, baselines and
    the plan; the budget as a vertical line (drops are point estimates; feasibility uses the
    upper bound, so some feasible points lie right of nothing and left of the line)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    feas = [(d, t) for d, t, ok in trials if ok]
    infeas = [(d, t) for d, t, ok in trials if not ok]
    if infeas:
        ax.scatter(*zip(*infeas), s=8, c="0.75", label="trial over budget")
    if feas:
        ax.scatter(*zip(*feas), s=10, c="tab:blue", label="trial within budget")
        front, best = [], -1.0
        for d, t in sorted(feas):
            if t > best:
                front.append((d, t))
                best = t
        ax.step(*zip(*front), where="post", c="tab:blue", lw=1.2, label="Pareto front (feasible)")
    for name, d, t in baselines:
        ax.scatter([d], [t], marker="s", s=30, edgecolors="k", zorder=3)
        ax.annotate(name, (d, t), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.scatter([plan[0]], [plan[1]], marker="*", s=160, c="tab:red", zorder=4, label="plan")
    ax.axvline(budget, ls="--", c="tab:red", lw=0.8, label=f"budget {budget:g}")
    unit = "nats" if metric == "kl" else "fraction"
    ax.set_xlabel(f"predicted {metric} drop ({unit}, point estimate)")
    ax.set_ylabel("predicted decode tokens/s (closed form)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_levels(path: str | Path, layers: Sequence[dict], title: str) -> Path:
    """Level per MoE layer (0 = raw), one colour per codec."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.14 * len(layers) + 2), 3.5))
    codecs = sorted({x["codec"] for x in layers})
    colors = {c: f"C{i}" for i, c in enumerate(codecs)}
    xs = [x["layer"] for x in layers]
    ys = [x["level"] if x["level"] is not None else 0.0 for x in layers]
    ax.bar(xs, ys, color=[colors[x["codec"]] for x in layers])
    for c in codecs:
        ax.bar([], [], color=colors[c], label=c)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("bound level (0 = raw or unbounded codec)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_budget_sweep(path: str | Path, rows: Sequence[dict], metric: str, title: str) -> Path:
    """Predicted tokens/s of the MILP plan and of the best uniform level against the budget."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["budget"] for r in rows]
    ax.plot(xs, [r["plan_tokens_per_s"] for r in rows], "o-", label="per-layer plan (MILP)")
    uni = [(r["budget"], r["uniform_tokens_per_s"]) for r in rows
           if r.get("uniform_tokens_per_s") is not None]
    if uni:
        ax.plot(*zip(*uni), "s--", label="best uniform level")
    if rows and rows[0].get("raw_tokens_per_s") is not None:
        ax.axhline(rows[0]["raw_tokens_per_s"], c="0.5", ls=":", label="no compression")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(f"accuracy budget ({metric} drop, one-sided bound)")
    ax.set_ylabel("predicted decode tokens/s (closed form)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _tps(cf, table, choice) -> float:
    return float(cf.tokens_per_s_many(*table.inputs(np.asarray(choice)))[0])


def budget_sweep(outcome, budgets) -> list[dict]:
    """MILP plan and best uniform level at each budget (same profile, table and cost model)."""
    from planner.milp import solve_knapsack

    table, acc, cf = outcome.table, outcome.accuracy, outcome.closed_form
    L = len(table.moe_layers)
    raw = _tps(cf, table, np.zeros(L, dtype=int))
    rows = []
    for b in budgets:
        con = acc.constraint(float(b))
        res = solve_knapsack(table.layer_s, table.mu, table.var, con)
        uni = None
        for c in range(1, len(table.specs)):
            ch = np.full(L, c)
            if table.available[:, c].all() and con.feasible(*table.sums(ch)):
                tps = _tps(cf, table, ch)
                uni = tps if uni is None else max(uni, tps)
        rows.append({"budget": float(b), "plan_tokens_per_s": _tps(cf, table, res.choice)
                     if res is not None else None, "uniform_tokens_per_s": uni,
                     "raw_tokens_per_s": raw, "certified": bool(res.certified) if res else None})
    return rows


def write_plots(outcome, directory, sweep_factors=(0.25, 0.5, 1.0, 2.0, 4.0)
                ) -> list:
    """The plan's plots into `directory`: pareto.png, levels.png, budget.png."""
    import optuna

    directory = Path(directory)
    doc = outcome.plan.doc
    acc = outcome.accuracy
    budget = doc["budget"]["value"]
    name = doc["model"]["geometry_name"]
    trials = []
    for t in outcome.study.get_trials(deepcopy=False):  # every phase of the study
        if t.state == optuna.trial.TrialState.COMPLETE and "M" in t.user_attrs:
            ok = all(v <= 0 for v in t.constraints.values())
            trials.append((acc.predict_sums(t.user_attrs["M"], t.user_attrs["V"]).drop,
                           float(t.values[0]), ok))
    bases = [(b.get("label", b["name"]), b["accuracy_drop"]["value"], b["tokens_per_s"])
             for b in doc["baselines"]
             if b["tokens_per_s"] is not None and b["accuracy_drop"] is not None]
    plan_pt = (doc["predicted"]["accuracy_drop"]["value"],
               doc["predicted"]["tokens_per_s_closed_form"])
    src = doc["model"]["profile_source"]
    out = [plot_pareto(directory / "pareto.png", trials, bases, plan_pt, budget,
                       doc["budget"]["metric"], f"{name}: predicted tokens/s vs accuracy drop "
                       f"({src} profile)"),
           plot_levels(directory / "levels.png", doc["layers"],
                       f"{name}: planned level per MoE layer (budget {budget:g})")]
    budgets = [budget * f for f in sweep_factors if budget * f > 0]
    if budgets:
        rows = budget_sweep(outcome, budgets)
        out.append(plot_budget_sweep(directory / "budget.png", rows, doc["budget"]["metric"],
                                     f"{name}: predicted tokens/s against the accuracy budget"))
    return out
