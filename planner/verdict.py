"""The validation verdict: does a plan's measured accuracy drop stay within its budget?

A plan promises that its metric (content or strict accuracy, averaged over the tasks) drops by at
most the budget B. Validation measures, per task and on the same prompts, the paired change against
the unperturbed model with its 95 % interval (Newcombe's method for paired proportions). This
module turns those per-task intervals into one interval for the drop averaged over tasks, and that
interval into a verdict:

- `held`: the interval's upper end is within the budget (the drop is at most B at 95 %);
- `violated`: its lower end is beyond the budget (the drop exceeds B at 95 %);
- `inconclusive`: the interval straddles B; then `more_prompts` estimates how many more prompts
  would let the interval clear B if the point estimate stayed where it is.

Averaging intervals: the tasks use disjoint prompts, so their changes are independent, and the
interval for the mean is built with MOVER (the method of variance estimates recovery, Zou & Donner,
Stat. Med. 2008) — the same construction Newcombe's paired interval uses inside one task: the
distance from the estimate to each end is recovered from each task's own asymmetric interval and
combined in quadrature, `L = m - sqrt(sum (d_t - l_t)^2) / T`, `U = m + sqrt(sum (u_t - d_t)^2) / T`.

Sample size: for a paired difference of proportions the variance of the estimated change is
`(p01 + p10 - (p01 - p10)^2) / n` (p01, p10 the discordance rates), so at fixed discordance rates the
half-width of the interval shrinks as `1 / sqrt(n)`; MOVER keeps that scaling when every task grows
by the same factor. To move the relevant end of the interval (the upper end when the estimate is
below the budget, the lower end when it is above) from distance `h` to the gap `g = |m - B|` takes
`(h / g)^2` times the prompts. This is a projection (labelled `estimated`): the estimate itself moves
as prompts are added, and Newcombe's interval is only approximately `1 / sqrt(n)` at small counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from profiles.errors import MoeszError
from profiles.evaluation.accuracy import Interval

VERDICTS = ("held", "violated", "inconclusive")
MAX_FACTOR = 1e4  # beyond this a projected prompt count means nothing
MOVER_METHOD = "MOVER mean of per-task {inner} intervals (Zou & Donner 2008)"


def negate(iv: Interval, method: str | None = None) -> Interval:
    """The interval of minus the quantity (a change becomes a drop)."""
    return Interval(0.0 - iv.value, 0.0 - iv.high, 0.0 - iv.low, method or iv.method)


def check_interval(iv: Interval, where: str = "interval") -> Interval:
    """`iv` if its ends are finite and ordered, else MoeszError naming `where`."""
    if not all(math.isfinite(x) for x in (iv.value, iv.low, iv.high)) \
            or not iv.low <= iv.value <= iv.high:
        raise MoeszError(f"{where}: {iv.value!r} [{iv.low!r}, {iv.high!r}] is not a finite "
                         f"interval with low <= value <= high")
    return iv


@dataclass(frozen=True)
class TaskChange:
    """One task's paired change of a metric (perturbed minus base) on `n` prompts."""

    task: str
    n: int
    change: Interval


@dataclass(frozen=True)
class Verdict:
    """The verdict on a measured drop against a budget.

    Attributes:
        verdict: `held`, `violated` or `inconclusive`.
        reason: one sentence with the numbers that decided it.
        more_prompts: for `inconclusive`, the estimated additional prompts over all tasks that would
            decide (None otherwise, or when no finite number would: estimate exactly on the budget).
        more_prompts_per_task: the same split over tasks, each task scaled by the same factor.
    """

    verdict: str
    reason: str
    more_prompts: int | None = None
    more_prompts_per_task: dict[str, int] | None = None

    def to_dict(self) -> dict:
        d = {"verdict": self.verdict, "reason": self.reason}
        if self.verdict == "inconclusive":
            d["more_prompts"] = {"total": self.more_prompts, "per_task": self.more_prompts_per_task,
                                 "source": "estimated",
                                 "method": "half-width scales as 1/sqrt(n) at fixed discordance "
                                           "rates; (h/gap)^2 times the prompts"}
        return d


def mean_change(changes: Sequence[TaskChange]) -> Interval:
    """The change averaged over tasks (equal task weights) with its MOVER interval.

    Raises:
        MoeszError: no tasks.
    """
    if not changes:
        raise MoeszError("no task results to average; evaluate at least one task")
    t = len(changes)
    if t == 1:
        return changes[0].change
    m = sum(c.change.value for c in changes) / t
    lo = m - math.sqrt(sum((c.change.value - c.change.low) ** 2 for c in changes)) / t
    hi = m + math.sqrt(sum((c.change.high - c.change.value) ** 2 for c in changes)) / t
    inner = sorted({c.change.method for c in changes})
    method = MOVER_METHOD.format(inner="/".join(inner))
    return Interval(m, max(lo, -1.0), min(hi, 1.0), method)


def decide(drop: Interval, budget: float, changes: Sequence[TaskChange] = ()) -> Verdict:
    """The verdict of a measured `drop` (positive = worse) against `budget`.

    Args:
        drop: the measured drop of the plan's metric averaged over tasks, with its interval.
        budget: the largest allowed drop (same units as `drop`).
        changes: the per-task results behind `drop`, to size `more_prompts` (by task).

    Returns:
        The `Verdict`.

    Raises:
        MoeszError: a negative or non-finite budget.
    """
    check_interval(drop, "measured drop")
    if not math.isfinite(budget) or budget < 0:
        raise MoeszError(f"budget {budget!r} is not a non-negative number; expected e.g. 0.01")
    f = "+.4f" if max(abs(drop.low), abs(drop.high), budget) >= 1e-3 else "+.3g"  # KL: tiny
    text = (f"measured drop {drop.value:{f}}, 95 % interval [{drop.low:{f}}, {drop.high:{f}}], "
            f"budget {budget:g}")
    if drop.high <= budget:
        return Verdict("held", f"{text}: the upper end is within the budget")
    if drop.low > budget:
        return Verdict("violated", f"{text}: the lower end is beyond the budget")
    gap = abs(drop.value - budget)
    reach = drop.high - drop.value if drop.value < budget else drop.value - drop.low
    n_now = {c.task: c.n for c in changes}
    if gap == 0 or reach == 0:
        return Verdict("inconclusive", f"{text}: the estimate sits on the budget, so no number of "
                       f"prompts is projected to decide", None, None)
    if reach > gap * math.sqrt(MAX_FACTOR):
        return Verdict("inconclusive", f"{text}: the estimate is so close to the budget that more "
                       f"than {MAX_FACTOR:,.0f}x the prompts would be needed to decide", None, None)
    factor = (reach / gap) ** 2
    per_task = {task: max(1, math.ceil(n * factor) - n) for task, n in n_now.items()}
    total = sum(per_task.values()) if per_task else None
    more = (f"; about {total} more prompts ({factor:.1f}x the {sum(n_now.values())} used, "
            f"estimated) would decide if the estimate held" if total else "")
    return Verdict("inconclusive", f"{text}: the interval straddles the budget{more}", total,
                   per_task or None)
