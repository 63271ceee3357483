"""Accuracy with honest uncertainty: proportions and their 95 % Wilson score intervals.

A task's strict and content accuracy are proportions of n independent prompts, so each is reported
with the Wilson score interval (E. B. Wilson, JASA 22, 1927), which stays inside [0, 1] and keeps
near-nominal coverage at small n and at 0 % or 100 %, where the textbook Wald interval collapses
to a point (Brown, Cai and DasGupta, Statistical Science 16, 2001). Every interval travels as an
`Interval` record `{value, low, high, method}` so that the method is never lost on the way to a
table or a JSON file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from scipy.stats import norm

from profiles.errors import MoeszError

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval, with the method that produced it."""

    value: float
    low: float
    high: float
    method: str

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        return cls(float(d["value"]), float(d["low"]), float(d["high"]), str(d["method"]))

    def format(self, percent: bool = True, signed: bool = False) -> str:
        """`87.5 % [80.1, 92.4]` (or the fraction when `percent` is False)."""
        scale, unit = (100.0, " %") if percent else (1.0, "")
        sign = "+" if signed else ""
        return (f"{self.value * scale:{sign}.1f}{unit} "
                f"[{self.low * scale:{sign}.1f}, {self.high * scale:{sign}.1f}]")


@lru_cache(maxsize=16)
def z_value(confidence: float = CONFIDENCE) -> float:
    """The two-sided standard-normal quantile, 1.959964 for 95 %."""
    if not 0.0 < confidence < 1.0:
        raise MoeszError(f"confidence {confidence!r} must lie strictly between 0 and 1 (e.g. 0.95)")
    return float(norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval for a binomial proportion.

    Args:
        successes: correct answers, 0 <= successes <= n.
        n: prompts evaluated, n >= 1.
        confidence: two-sided confidence level.

    Returns:
        `Interval(value=successes/n, low, high, method)`; for 8 of 10, 0.8 [0.4902, 0.9433].

    Raises:
        MoeszError: n < 1 or successes outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise MoeszError(f"a proportion needs 0 <= successes <= n and n >= 1, got {successes} of "
                         f"{n}")
    z = z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 and n the exact limits are 0 and 1; clamp away floating-point residue
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, f"wilson score {confidence:.0%}")


def proportion(correct: Sequence[bool], confidence: float = CONFIDENCE) -> Interval:
    """Wilson interval of the share of True values in `correct`."""
    return wilson_interval(sum(bool(c) for c in correct), len(correct), confidence)
