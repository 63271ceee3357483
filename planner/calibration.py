"""How next-token KL maps to the accuracy change of the benchmarks, fitted on a profile.

KL on text is continuous and cheap, with tight intervals, where accuracy counts resolve only
large changes. When a profile has both (tasks and text metrics), every measured point gives a
pair (KL, content drop averaged over tasks with its paired interval); the calibration fits

    drop = beta * KL

by weighted least squares through the origin (weights 1 / the drop's variance), with the
standard error of beta inflated by the reduced chi-square when the points scatter more than their
intervals allow (the same fit as the accuracy model's additivity factor). A plan made on a KL
budget then states the accuracy drop its predicted KL implies, with beta's interval and the
fit's chi-square, so a reader sees how far to trust the mapping (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from planner.accuracy import Z95

EXACT = ("raw", "lossless")


@dataclass(frozen=True)
class Calibration:
    """content drop ~= beta * KL (nats per token), fitted on `points` profile points."""

    beta: float
    beta_se: float
    chi2_reduced: float | None
    points: int

    def predict(self, kl: float, kl_low: float, kl_high: float) -> dict:
        """The content drop a KL (and its interval) implies, with beta's 95 % interval."""
        lo_b, hi_b = self.beta - Z95 * self.beta_se, self.beta + Z95 * self.beta_se
        return {"value": self.beta * kl, "low": min(lo_b * kl_low, lo_b * kl_high),
                "high": max(hi_b * kl_high, hi_b * kl_low),
                "method": "content drop = beta x KL (calibration on the profile's points, "
                          "95% interval of beta and of KL)",
                "kind": "predicted (KL calibration)"}

    def to_dict(self) -> dict:
        return {"beta": self.beta, "beta_se": self.beta_se, "chi2_reduced": self.chi2_reduced,
                "points": self.points, "model": "content drop = beta x KL (nats per token), "
                "weighted least squares through the origin"}


def calibration_points(sensitivity: pd.DataFrame) -> list[tuple[str, str, float, float, float]]:
    """(target, storage, KL, content drop, drop sd) per measured lossy point with tasks."""
    from profiles.profiling.metrics import TEXT_ROW
    from profiles.profiling.sensitivity import mean_change_interval

    s = sensitivity
    if "kl_low" not in s.columns:
        return []
    s = s[(s["surrogate"].astype(str) == "none") & (s["task"].astype(str) != TEXT_ROW)
          & s["kl_nats"].notna() & s["content_change"].notna()]
    out = []
    for key, g in s.groupby(["target", "codec", "mode", "level"], dropna=False, sort=True):
        if str(key[1]) in EXACT or bool(g["stopped_early"].any()):
            continue
        c, lo, hi = mean_change_interval(list(zip(g["content_change"], g["content_change_low"],
                                                  g["content_change_high"])))
        level = "" if key[3] != key[3] else f":{key[3]:g}"
        out.append((str(key[0]), f"{key[1]}{level}", float(g["kl_nats"].iloc[0]), -c,
                    (hi - lo) / 2 / Z95))
    return out


def fit_calibration(sensitivity: pd.DataFrame) -> Calibration | None:
    """The calibration of a profile, or None without at least two points with KL > 0."""
    pts = [p for p in calibration_points(sensitivity) if p[2] > 0]
    if len(pts) < 2:
        return None
    kl = np.array([p[2] for p in pts])
    drop = np.array([p[3] for p in pts])
    w = 1 / np.array([max(p[4], 1e-6) ** 2 for p in pts])
    sxx = float((w * kl * kl).sum())
    beta = float((w * kl * drop).sum() / sxx)
    chi2 = float((w * (drop - beta * kl) ** 2).sum() / (len(pts) - 1))
    se = math.sqrt(1 / sxx) * math.sqrt(max(1.0, chi2))
    return Calibration(beta, se, chi2, len(pts))
