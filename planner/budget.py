"""Budgets that name their metric: `--budget kl=0.02`, `ppl=1.01`, `content=0.01`, `TASK=0.02`.

A budget's metric must be one the model profile has (`profiles.profiling.metrics`): content and
strict accuracy averaged over its tasks, one task's content accuracy by its name, next-token KL
(nats per token) or the perplexity ratio on its text. Perplexity budgets are ratios and are
planned as drops of ratio - 1; every other budget is the largest allowed drop itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from profiles.errors import ConfigError

METRIC_UNITS = {"content": "fraction of prompts", "strict": "fraction of prompts",
                "kl": "nats per token", "ppl": "perplexity ratio - 1"}


def parse_budget(text: str) -> tuple[str, str]:
    """`kl=0.02` -> ("kl", "0.02"); the metric is checked against the profile later.

    Raises:
        ConfigError: no `=`, or an empty metric or value.
    """
    metric, sep, value = str(text).partition("=")
    if not sep or not metric.strip() or not value.strip():
        raise ConfigError(f"--budget {text!r}: expected METRIC=VALUE, e.g. kl=0.02 (nats per "
                          f"token), ppl=1.01 (perplexity ratio), content=0.01 or mybench=0.02")
    return metric.strip(), value.strip()


def resolve_metric(metric: str, prof) -> tuple[str, list[str] | None, dict]:
    """(accuracy-model metric, tasks to average over or None, the profile's metrics record) for a
    budget metric: content, strict, kl, ppl, or a task's name (its content accuracy).

    Raises:
        ConfigError: the profile does not have the metric (the message lists those it has).
    """
    from profiles.profiling.metrics import AGGREGATE_METRICS, check_metric, profile_metrics

    metrics = dict(profile_metrics(prof.doc))
    if "metrics" not in prof.doc:   # an older (or synthetic) profile: what its rows hold
        metrics["available"] = ["content", "strict", "kl"] + prof.tasks
    check_metric(metric, metrics, f"the profile {prof.path}")
    if metric in AGGREGATE_METRICS:
        return metric, None, metrics
    return "content", [metric], metrics


def budget_value(budget: Any, metric: str) -> float:
    """The largest allowed drop for a budget given by the user: `ppl` budgets are ratios
    (1.01 allows 1 %), drops of ratio - 1; every other metric's budget is its drop."""
    b = check_budget(budget)
    if metric != "ppl":
        return b
    if b < 1:
        raise ConfigError(f"--budget ppl={budget}: a perplexity-ratio budget is at least 1 (e.g. "
                          f"1.01 allows 1 % more perplexity)")
    return b - 1.0


def check_budget(budget: Any) -> float:
    """The budget as a float >= 0, or a ConfigError naming the problem."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ConfigError(f"--accuracy-budget {budget!r} is not a number; give a drop such as "
                          f"0.01 (one point of accuracy) or 0.05 nats for --metric kl") from None
    if not math.isfinite(b) or b < 0:
        raise ConfigError(f"--accuracy-budget {budget!r} must be a finite number >= 0 (e.g. 0.01)")
    return b


@dataclass(frozen=True)
class Budget:
    """One budget of a plan: the metric as the user named it, the value as given (a ratio for
    ppl), the largest allowed drop, and the accuracy model that predicts it."""

    metric: str
    given: float
    value: float
    accuracy: Any   # planner.accuracy.AccuracyModel

    def record(self, drop) -> dict:
        """This budget against a drop (a `DropPrediction`, or None when it cannot be told)."""
        ucb = None if drop is None else float(drop.ucb)
        return {"metric": self.metric, "value": self.value, "given": self.given,
                "unit": METRIC_UNITS[self.accuracy.metric],
                "drop": None if drop is None else drop.to_dict(), "ucb": ucb,
                "meets": ucb is not None and ucb <= self.value + 1e-12,
                "used": None if ucb is None else (ucb / self.value if self.value > 0
                                                  else (0.0 if ucb <= 0 else math.inf))}


def make_budget(metric: str, given: Any, prof, z: float, per_matrix: bool = False) -> Budget:
    """A `Budget` on a profile, its metric checked (`resolve_metric`) and value converted; with
    `per_matrix`, its accuracy model also answers per-matrix choices (`attach_matrices`), as the
    primary budget's does."""
    from planner.accuracy import AccuracyModel

    base, tasks, _ = resolve_metric(metric, prof)
    value = budget_value(given, metric)
    accuracy = AccuracyModel(prof.sensitivity, base, z=z, tasks=tasks)
    if per_matrix:
        accuracy.attach_matrices(prof.sensitivity)
    return Budget(metric, float(given), value, accuracy)


def predicted_drop(budget: Budget, option):
    """An option's predicted drop of `budget`'s metric: the profile's whole-model measurement
    for a uniform policy it measured, else the additive model; None when neither can tell (a
    choice without single-layer rows)."""
    from profiles.errors import ProfileError

    labels = {int(x["layer"]): x["spec"] for x in option.layers}
    if len(set(labels.values())) == 1:
        measured = budget.accuracy.measured_uniform(next(iter(labels.values())))
        if measured is not None:
            return measured
    try:
        return budget.accuracy.predict(labels)
    except ProfileError:
        return None


def binding(records: list[dict]) -> str | None:
    """The metric whose bound uses the largest share of its budget (None without any bound)."""
    known = [r for r in records if r["used"] is not None]
    return max(known, key=lambda r: r["used"])["metric"] if known else None
