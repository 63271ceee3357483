"""Paired comparison of a perturbed model against the unperturbed one on the same prompts.

Both models answer the same n prompts, so their per-prompt outcomes are paired: the difference of
accuracies is estimated from the 2x2 table of (base correct?, perturbed correct?) counts

|                   | base right | base wrong |
|---|---|---|
| perturbed right   | both       | gained     |
| perturbed wrong   | lost       | neither    |

and only the discordant prompts (`gained`, `lost`) carry evidence of a change.

- The change `(gained - lost) / n` gets Newcombe's hybrid score interval for paired proportions,
  "method 10" of R. G. Newcombe, Statistics in Medicine 17:2635-2650 (1998): Wilson limits of each
  marginal proportion combined by square-and-add with their estimated correlation (the phi
  coefficient with Newcombe's continuity-corrected numerator).
- The exact (conditional) McNemar test: under no change each discordant prompt is equally likely to
  fall either way, so p = min(1, 2 * P[Binomial(gained + lost, 1/2) <= min(gained, lost)]).
- A sweep compares many configurations at once; `holm_adjust` (S. Holm, Scand. J. Statist. 6, 1979)
  controls the family-wise error so "improved" or "degraded" is claimed only when it survives.

Greedy decoding and real codecs are deterministic: re-running with another seed gives the same
outcomes, not new evidence, so n is the number of prompts and never prompts x seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy.stats import binom

from profiles.errors import MoeszError
from profiles.evaluation.accuracy import CONFIDENCE, Interval, wilson_interval

NEWCOMBE_METHOD = "newcombe paired (method 10, 1998) {:.0%}"
VERDICTS = ("improved", "degraded", "no significant change")


@dataclass(frozen=True)
class PairedComparison:
    """How a perturbed model's outcomes differ from the base model's on the same prompts.

    `change` is perturbed minus base accuracy (negative = worse) with its paired interval;
    `mcnemar_p` is the exact two-sided McNemar p-value (1.0 with no discordant prompts).
    """

    metric: str
    n: int
    both: int
    gained: int
    lost: int
    neither: int
    change: Interval
    mcnemar_p: float

    def to_dict(self) -> dict:
        return {"metric": self.metric, "n": self.n, "both": self.both, "gained": self.gained,
                "lost": self.lost, "neither": self.neither, "change": self.change.to_dict(),
                "mcnemar_p": self.mcnemar_p}

    @classmethod
    def from_dict(cls, d: dict) -> "PairedComparison":
        return cls(d["metric"], int(d["n"]), int(d["both"]), int(d["gained"]), int(d["lost"]),
                   int(d["neither"]), Interval.from_dict(d["change"]), float(d["mcnemar_p"]))


def newcombe_paired_interval(both: int, gained: int, lost: int, neither: int,
                             confidence: float = CONFIDENCE) -> Interval:
    """Newcombe's method-10 interval for the difference of paired proportions p1 - p2.

    Args:
        both: pairs where both measurements succeed.
        gained: pairs where the first (perturbed) succeeds and the second (base) fails.
        lost: pairs where the first fails and the second succeeds.
        neither: pairs where both fail.
        confidence: two-sided confidence level.

    Returns:
        The difference (gained - lost) / n with its interval; for the table 59, 6, 16, 80
        (Fagerland, Lydersen and Laake 2017, section 8) -0.0621 [-0.1186, -0.0046].

    Raises:
        MoeszError: a negative count or no pairs at all.
    """
    counts = (both, gained, lost, neither)
    if min(counts) < 0 or sum(counts) == 0:
        raise MoeszError(f"a paired table needs non-negative counts and at least one pair, got "
                         f"{counts}")
    n = sum(counts)
    p1, p2 = (both + gained) / n, (both + lost) / n
    w1 = wilson_interval(both + gained, n, confidence)
    w2 = wilson_interval(both + lost, n, confidence)
    phi = _phi(both, gained, lost, neither)
    d1, e1 = p1 - w1.low, w1.high - p1
    d2, e2 = p2 - w2.low, w2.high - p2
    low = (p1 - p2) - math.sqrt(max(0.0, d1 * d1 + e2 * e2 - 2 * phi * d1 * e2))
    high = (p1 - p2) + math.sqrt(max(0.0, d2 * d2 + e1 * e1 - 2 * phi * d2 * e1))
    return Interval(p1 - p2, max(-1.0, low), min(1.0, high), NEWCOMBE_METHOD.format(confidence))


def _phi(a: int, b: int, c: int, d: int) -> float:
    """Newcombe's correlation estimate: (ad - bc) reduced by n/2 toward 0 when positive."""
    n = a + b + c + d
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        return 0.0
    cross = a * d - b * c
    if cross > n / 2:
        cross -= n / 2
    elif cross >= 0:
        cross = 0
    return cross / math.sqrt(margins)


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (1.0 when there are none).

    For gained = 6, lost = 16 it is 2 * P[Binomial(22, 1/2) <= 6] = 0.052479.
    """
    if gained < 0 or lost < 0:
        raise MoeszError(f"discordant counts must be non-negative, got {gained} and {lost}")
    m = gained + lost
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(gained, lost), m, 0.5)))


def compare_paired(base: Sequence[bool], perturbed: Sequence[bool], metric: str = "content",
                   confidence: float = CONFIDENCE) -> PairedComparison:
    """Paired comparison of per-prompt outcomes, prompt i of `base` paired with prompt i of
    `perturbed`.

    Raises:
        MoeszError: the sequences are empty or of different lengths (not the same prompts).
    """
    if len(base) != len(perturbed) or not base:
        raise MoeszError(f"paired comparison needs the same non-empty prompt list for both models; "
                         f"got {len(base)} base and {len(perturbed)} perturbed outcomes")
    both = gained = lost = 0
    for b, p in zip(base, perturbed):
        both += bool(b) and bool(p)
        gained += bool(p) and not b
        lost += bool(b) and not p
    neither = len(base) - both - gained - lost
    return PairedComparison(metric, len(base), both, gained, lost, neither,
                            newcombe_paired_interval(both, gained, lost, neither, confidence),
                            mcnemar_exact_p(gained, lost))


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order.

    The i-th smallest p (1-based) is multiplied by (m - i + 1), made monotone and capped at 1; a
    comparison is significant at family-wise level alpha when its adjusted p <= alpha.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adjusted[i] = running
    return adjusted


def holm_verdicts(comparisons: Sequence[PairedComparison], alpha: float = 0.05
                  ) -> list[tuple[str, float]]:
    """("improved" | "degraded" | "no significant change", Holm-adjusted p) per comparison.

    The whole sequence is one family: pass every comparison of a sweep together.
    """
    if not 0.0 < alpha < 1.0:
        raise MoeszError(f"alpha {alpha!r} must lie strictly between 0 and 1 (e.g. 0.05)")
    adjusted = holm_adjust([c.mcnemar_p for c in comparisons])
    out = []
    for c, p in zip(comparisons, adjusted):
        if p <= alpha and c.change.value > 0:
            out.append(("improved", p))
        elif p <= alpha and c.change.value < 0:
            out.append(("degraded", p))
        else:
            out.append(("no significant change", p))
    return out
