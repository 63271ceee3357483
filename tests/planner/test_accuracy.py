"""The additive accuracy model on small sensitivity tables shaped like docs/model-profile.md."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.accuracy import Z95, AccuracyModel, Constraint
from profiles.errors import ConfigError, ProfileError

COLUMNS = ["target", "target_kind", "layers", "experts", "codec", "mode", "level", "surrogate",
           "task", "n", "strict_base", "strict", "content_base", "content", "strict_change",
           "strict_change_low", "strict_change_high", "content_change", "content_change_low",
           "content_change_high", "strict_mcnemar_p", "content_mcnemar_p", "interval_method",
           "kl_nats", "top1_agreement", "stopped_early"]


def row(target, layers, level, task, change, half, p=0.5, kl=0.0, codec="szp"):
    kind = "layer" if target.startswith("layer:") else ("model" if target == "all" else "group")
    bounded = level is not None
    return {"target": target, "target_kind": kind, "layers": ",".join(map(str, layers)),
            "experts": "all", "codec": codec, "mode": "meanabs" if bounded else "none",
            "level": float(level) if bounded else float("nan"), "surrogate": "none",
            "task": task, "n": 500, "strict_base": 0.7, "strict": 0.7 + change,
            "content_base": 0.8, "content": 0.8 + change, "strict_change": change,
            "strict_change_low": change - half, "strict_change_high": change + half,
            "content_change": change, "content_change_low": change - half,
            "content_change_high": change + half, "strict_mcnemar_p": p, "content_mcnemar_p": p,
            "interval_method": "newcombe-paired", "kl_nats": kl, "top1_agreement": 0.99,
            "stopped_early": False}


def table(rows):
    df = pd.DataFrame(rows)
    assert list(df.columns) == COLUMNS
    return df


def test_mean_and_sd_average_over_tasks():
    df = table([row("layer:0", [0], 0.5, "a", -0.02, 0.01),
                row("layer:0", [0], 0.5, "b", -0.04, 0.03)])
    m = AccuracyModel(df, "content")
    mu, sd = m.effect(0, "szp:meanabs:0.5,variant=fixed")
    assert mu == pytest.approx(0.03)  # drop = -change, averaged
    assert sd == pytest.approx(math.sqrt((0.01 / Z95) ** 2 + (0.03 / Z95) ** 2) / 2)
    assert m.effect(0, "raw") == (0.0, 0.0) and m.effect(0, "lossless,zstd_level=3") == (0.0, 0.0)
    assert m.effect(1, "szp:meanabs:0.5,variant=fixed") is None


def test_prediction_sums_means_and_variances():
    df = table([row(f"layer:{i}", [i], 0.5, "a", -0.01 * (i + 1), 0.01) for i in range(3)])
    m = AccuracyModel(df, "content", z=2.0)
    lab = "szp:meanabs:0.5,variant=fixed"
    p = m.predict({0: lab, 2: lab, 1: "raw"})
    s = 0.01 / Z95
    assert p.drop == pytest.approx(0.04)
    assert p.sd == pytest.approx(math.sqrt(2) * s)
    assert p.ucb == pytest.approx(0.04 + 2.0 * math.sqrt(2) * s)
    assert p.low < p.drop < p.high
    assert "alpha = 1 assumed" in m.additivity.note


def test_holm_keeps_a_strong_gain_and_zeroes_a_weak_one():
    rows = [row("layer:0", [0], 1.0, "a", +0.05, 0.01, p=1e-6),   # strong gain
            row("layer:1", [1], 1.0, "a", +0.01, 0.012, p=0.04),  # weak gain, fails Holm
            row("layer:2", [2], 1.0, "a", -0.03, 0.01, p=1e-4),
            row("layer:3", [3], 1.0, "a", -0.001, 0.01, p=0.8),
            row("layer:4", [4], 1.0, "a", -0.002, 0.01, p=0.7)]
    # p = 0.04 < 0.05 alone, but Holm compares it with 0.05 / 3 after two rejections
    m = AccuracyModel(table(rows), "content")
    lab = "szp:meanabs:1,variant=fixed"
    assert m.effect(0, lab)[0] == pytest.approx(-0.05)
    assert m.effect(1, lab)[0] == 0.0 and m.effects[(1, lab)].gain_zeroed
    assert m.effects[(1, lab)].measured_drop == pytest.approx(-0.01)
    assert m.effect(2, lab)[0] == pytest.approx(0.03)


def test_additivity_fit_recovers_a_known_factor():
    rows = []
    for lv, drops in ((0.3, (0.01, 0.02, 0.005)), (1.0, (0.04, 0.05, 0.02))):
        for i, d in enumerate(drops):
            rows.append(row(f"layer:{i}", [i], lv, "a", -d, 0.002))
        rows.append(row("all", [0, 1, 2], lv, "a", -1.5 * sum(drops), 0.002))
        rows.append(row("group:first", [0, 1], lv, "a", -1.5 * sum(drops[:2]), 0.002))
    m = AccuracyModel(table(rows), "content")
    assert m.additivity.points == 4
    assert m.additivity.alpha == pytest.approx(1.5, rel=1e-6)
    assert m.additivity.alpha_se > 0
    lab = "szp:meanabs:1,variant=fixed"
    assert m.predict({0: lab}).drop == pytest.approx(1.5 * 0.04)
    assert m.measured("all", lab).drop == pytest.approx(1.5 * 0.11)


def test_kl_metric_uses_kl_nats_and_task_spread():
    rows = [row("layer:0", [0], 0.5, "a", 0.0, 0.01, kl=0.02),
            row("layer:0", [0], 0.5, "b", 0.0, 0.01, kl=0.04)]
    m = AccuracyModel(table(rows), "kl")
    mu, sd = m.effect(0, "szp:meanabs:0.5,variant=fixed")
    assert mu == pytest.approx(0.03)
    assert sd == pytest.approx(np.std([0.02, 0.04], ddof=1) / math.sqrt(2))


def test_bad_inputs():
    df = table([row("layer:0", [0], 0.5, "a", -0.01, 0.01)])
    with pytest.raises(ConfigError, match="metric"):
        AccuracyModel(df, "accuracy")
    with pytest.raises(ConfigError, match="z"):
        AccuracyModel(df, "content", z=-1)
    with pytest.raises(ProfileError, match="single-layer"):
        AccuracyModel(table([row("all", [0, 1], 0.5, "a", -0.01, 0.01)]), "content")


def test_detection_warning():
    df = table([row("layer:0", [0], 0.5, "a", -0.01, 0.01)])
    m = AccuracyModel(df, "content")
    limit = {"metric": "content", "half_width": 0.02, "method": "x"}
    assert "below the smallest content change" in m.detection_warning(0.01, limit)
    assert m.detection_warning(0.05, limit) is None
    assert "estimated from the per-layer intervals" in m.detection_warning(0.001, None)


@settings(max_examples=60, deadline=None)
@given(alpha=st.floats(0.2, 2.0), se=st.floats(0.0, 1.0), z=st.floats(0.5, 3.0),
       budget=st.floats(0.001, 0.1), V=st.floats(0.0, 1e-3))
def test_m_interval_is_the_feasible_set(alpha, se, z, budget, V):
    con = Constraint(budget, z, alpha, se)
    lo, hi = -1.0, 1.0
    r = con.m_interval(V, lo, hi)
    grid = np.linspace(lo, hi, 4001)
    ok = con.g(grid, V) <= budget
    if r is None:
        assert not ok.any()
        return
    a, b = r
    assert con.g(a, V) <= budget * (1 + 1e-9) + 1e-12 and con.g(b, V) <= budget * (1 + 1e-9) + 1e-12
    inside = (grid >= a) & (grid <= b)
    assert np.all(ok[inside])
    step = grid[1] - grid[0]
    assert not np.any(ok & ((grid < a - step) | (grid > b + step)))
