"""The KL-to-accuracy calibration fitted on a profile's points (golden numbers)."""

from __future__ import annotations

import pandas as pd
import pytest

from planner.accuracy import Z95
from planner.calibration import fit_calibration


def _rows(points):
    """Two tasks per point, both with the same change and interval half-width 0.0196."""
    rows = []
    for target, kl, drop in points:
        for task in ("a", "b"):
            rows.append({"target": target, "codec": "szp", "mode": "meanabs", "level": 1.0,
                         "surrogate": "none", "task": task, "kl_nats": kl, "kl_low": kl * 0.9,
                         "kl_high": kl * 1.1, "content_change": -drop,
                         "content_change_low": -drop - 0.0196,
                         "content_change_high": -drop + 0.0196, "stopped_early": False})
    return pd.DataFrame(rows)


def test_exact_line_gives_its_slope_and_no_scatter():
    cal = fit_calibration(_rows([("layer:0", 0.01, 0.02), ("layer:1", 0.05, 0.10),
                                 ("all", 0.1, 0.2)]))
    assert cal.beta == pytest.approx(2.0)
    assert cal.chi2_reduced == pytest.approx(0.0, abs=1e-12)
    # each point's mean over 2 tasks has sd 0.0196 / 1.96 / sqrt(2); se = sd / sqrt(sum KL^2)
    sd = 0.0196 / Z95 / 2 ** 0.5
    assert cal.beta_se == pytest.approx(sd / (0.01 ** 2 + 0.05 ** 2 + 0.1 ** 2) ** 0.5)
    pred = cal.predict(0.02, 0.01, 0.03)
    assert pred["value"] == pytest.approx(0.04) and pred["low"] < 0.04 < pred["high"]


def test_scatter_inflates_the_error_and_too_few_points_give_none():
    tight = fit_calibration(_rows([("layer:0", 0.01, 0.02), ("layer:1", 0.05, 0.10)]))
    loose = fit_calibration(_rows([("layer:0", 0.01, 0.08), ("layer:1", 0.05, 0.02)]))
    assert loose.chi2_reduced > 1 and loose.beta_se > tight.beta_se
    assert fit_calibration(_rows([("layer:0", 0.01, 0.02)])) is None
    assert fit_calibration(_rows([]).reindex(columns=["kl_nats"])) is None
