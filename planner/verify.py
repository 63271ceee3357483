"""Plans checked by measurement: the additive model proposes, measurement decides.

After the search and the simulator's re-ranking, `n` candidate policies (the certified best,
and MILP optima at looser budgets that are predicted faster: `planner.pipeline`) are measured
for real on the profile split (`profiles.profiling.verify.measure_policies`: real codec
round trips, the profile's tasks, benchmarks and text, paired with the unperturbed baseline), and
the plan becomes the fastest candidate whose *measured* one-sided upper bound meets the budget.
The measured rows stay in the profile (`verified.parquet`), so a rerun reuses them. When no
measured candidate meets the budget, the plan stores every expert raw (bit-exact, so certainly
within any budget) and says which candidate came closest.

A measured drop is aggregated like the accuracy model's single-layer effects: accuracy metrics
as the mean change over the budget's tasks with the per-task paired half-widths combined in
quadrature, `kl` and `ppl` from their bootstrap intervals; the standard error is the 95 %
half-width / 1.96, and the bound is drop + z * sd with the plan's z.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

from planner.accuracy import TEXT_METRICS, Z95, AccuracyModel, DropPrediction
from profiles.profiling.metrics import TEXT_ROW

Progress = Callable[[int, int, str], None]
MEASURED_KIND = "measured (verified on the profile split, whole policy)"


def measured_drop(rows: Sequence[dict], accuracy: AccuracyModel) -> DropPrediction:
    """A policy's measured drop of the accuracy model's metric, from its verified rows."""
    from profiles.profiling.sensitivity import mean_change_interval

    m = accuracy.metric
    if m in TEXT_METRICS:
        r = rows[0]
        col, low, high, shift = (("kl_nats", "kl_low", "kl_high", 0.0) if m == "kl" else
                                 ("ppl_ratio", "ppl_ratio_low", "ppl_ratio_high", 1.0))
        drop = float(r[col]) - shift
        sd = (float(r[high]) - float(r[low])) / 2 / Z95
    else:
        parts = [(-float(r[f"{m}_change"]), -float(r[f"{m}_change_high"]),
                  -float(r[f"{m}_change_low"])) for r in rows
                 if r["task"] != TEXT_ROW and r["task"] in accuracy.tasks]
        drop, lo, hi = mean_change_interval(parts)
        sd = (hi - lo) / 2 / Z95
    sd = sd if math.isfinite(sd) else 0.0
    return DropPrediction(m, drop, sd, accuracy.z, drop, sd * sd, MEASURED_KIND)


# budgets the MILP proposes beyond, for --verify: the additive bound sums every layer's
# uncertainty, so policies it cannot certify may still measure within the budget
VERIFY_RELAX = (1.5, 2.0, 3.0, 4.0, 6.0)


def verify_candidates(options: Sequence, n: int, table, accuracy: AccuracyModel, budget: float,
                      option_of: Callable, tps_of: Callable, simulate: Callable | None) -> list:
    """What --verify N measures, fastest first: the best option the additive model certifies,
    the MILP optima at budgets VERIFY_RELAX times larger that are faster than it (closest to the
    budget first, N - 1 at most), then the next certified options up to N.

    Args:
        options: the ranked options of the plan (certified by the additive model).
        n: how many to measure.
        table: the choice table; accuracy, budget: the plan's accuracy model and budget.
        option_of: a search `Candidate` -> an option.
        tps_of: an assignment -> closed-form tokens/s.
        simulate: an option -> simulated tokens/s (None: rank by the closed form).
    """
    from planner.milp import solve_knapsack
    from planner.search import Candidate

    def speed(o) -> float:
        return o.tokens_per_s_simulation if o.tokens_per_s_simulation is not None \
            else o.tokens_per_s

    anchor, picked = options[0], [options[0]]
    seen = {tuple(x["spec"] for x in anchor.layers)}
    for k in VERIFY_RELAX:
        if len(picked) >= n:
            break
        res = solve_knapsack(table.layer_s, table.mu, table.var, accuracy.constraint(budget * k))
        if res is None:
            continue
        choice = tuple(int(c) for c in res.choice)
        M, V = table.sums(choice)
        o = option_of(Candidate(choice, tps_of(choice), M, V, table.host_bytes(choice), False,
                                -1))
        key = tuple(x["spec"] for x in o.layers)
        if key in seen:
            continue
        o = replace(o, source=f"MILP optimum at {k:g} x budget (not certified by the additive "
                              f"model)")
        if simulate is not None:
            o = replace(o, tokens_per_s_simulation=simulate(o))
        if speed(o) > speed(anchor):
            seen.add(key)
            picked.append(o)
    for o in options[1:]:
        if len(picked) >= n:
            break
        key = tuple(x["spec"] for x in o.layers)
        if key not in seen:
            seen.add(key)
            picked.append(o)
    return sorted(picked, key=lambda o: -speed(o))


def verify_options(prof, accuracy: AccuracyModel, budget: float, options: Sequence, n: int,
                   progress: Progress | None = None, more: Sequence = ()):
    """(the chosen option, or None when no measured candidate meets the budget; the plan's
    `verification` record) after measuring the best `n` distinct options (in their ranked
    order, fastest first)."""
    import time

    from profiles.profiling.verify import measure_policies, policy_digest

    t0 = time.perf_counter()
    picked, seen = [], set()
    for o in options:
        key = policy_digest(o.policy)
        if key not in seen:
            seen.add(key)
            picked.append(o)
        if len(picked) == n:
            break
    rows = measure_policies(prof.path, [o.policy for o in picked], progress=progress)
    records, chosen = [], None
    chosen_more = None
    for rank, (o, r) in enumerate(zip(picked, rows)):
        meas = measured_drop(r, accuracy)
        others = {b.metric: measured_drop(r, b.accuracy) for b in more}   # planner.budget
        ok = meas.ucb <= budget and all(others[b.metric].ucb <= b.value for b in more)
        records.append({"rank": rank + 1, "source": o.source,
                        "policy_digest": policy_digest(o.policy),
                        "tokens_per_s_closed_form": o.tokens_per_s,
                        "tokens_per_s_simulation": o.tokens_per_s_simulation,
                        "predicted_drop": o.drop.to_dict() if o.drop is not None else None,
                        "measured_drop": meas.to_dict(), "meets_budget_measured": ok,
                        "measured_more": {k: v.to_dict() for k, v in others.items()},
                        "layers": [x["spec"] for x in o.layers]})
        if ok and chosen is None:
            chosen, chosen_more = replace(o, drop=meas), others
    warning = None
    if chosen is None:
        warning = (f"{_none_met(records)}, so the plan stores every expert raw, which is "
                   f"exact; raise --verify or the budget, or profile with more prompts")
    return chosen, {"candidates": records, "verified": len(picked),
                    "chosen_accuracy": "measured" if warning is None else "exact (raw)",
                    "chosen_source": chosen.source if chosen else "baseline: no compression",
                    "chosen_more": chosen_more,
                    "warning": warning,
                    "rows_file": str(prof.path / "verified.parquet"),
                    "wall_s": time.perf_counter() - t0,
                    "method": "real codec round trips on the profile split, paired with the "
                              "profile's baseline; " + MEASURED_KIND}


def _none_met(records: Sequence[dict]) -> str:
    """What the verification found when no candidate met the budget, naming the closest."""
    lowest = min(records, key=lambda r: r["measured_drop"]["ucb"])
    return (f"none of the {len(records)} verified candidates meets the budget by its measured "
            f"upper bound (the lowest is {lowest['measured_drop']['ucb']:.4g}, "
            f"{lowest['source']})")


def fall_back(verification: dict, measured: Sequence, raw, speed: Callable) -> tuple:
    """(the chosen option, the verification record) when no verified candidate met the budget:
    the fastest of `measured` — policies the profile measured as a whole (uniform baselines with
    a measured upper bound within every budget) — or `raw` (every expert raw, exact) without one.

    Before this, the plan went straight to raw although the profile held measured uniform
    levels within budget (the verified candidates are the search's fastest, which can all fail
    while a slower measured level holds)."""
    rec = dict(verification)
    missed = _none_met(rec["candidates"])
    if not measured:
        return raw, rec
    best = max(measured, key=speed)
    rec.update(chosen_accuracy="measured (the profile's whole-model row)",
               chosen_source=best.source,
               warning=f"{missed}, so the plan falls back to {best.source.split(': ', 1)[-1]}, "
                       f"the fastest policy the profile measured as a whole within the budget "
                       f"(upper bound {best.drop.ucb:.4g}); raise --verify or the budget, or "
                       f"profile with more prompts, for a faster verified plan")
    return best, rec
