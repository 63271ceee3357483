"""Sweep grids, targets, policies of points and the detection-limit arithmetic (no model needed)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from profiles.errors import ConfigError
from profiles.profiling.grid import (BASELINE_CODECS, GridSpec, build_points, paper_groups,
                                     paper_layers, parse_experts, parse_groups, parse_layers,
                                     parse_levels, thirds)
from profiles.profiling.sensitivity import (budget_warning, mean_change_interval, point_policy,
                                            top_experts)

MOE = tuple(range(8))


def test_parse_levels_and_errors():
    assert parse_levels("3,0.1,1,0.1") == (0.1, 1.0, 3.0)
    for bad in ("0", "-1", "x", "nan", ""):
        with pytest.raises(ConfigError):
            parse_levels(bad)


def test_parse_layers_groups_and_targets():
    assert parse_layers("all", MOE) is None
    assert parse_layers("0-2,7", MOE) == (0, 1, 2, 7)
    with pytest.raises(ConfigError, match="not an MoE layer"):
        parse_layers("8", MOE)
    with pytest.raises(ConfigError, match="backwards"):
        parse_layers("3-1", MOE)
    assert thirds(MOE) == {"shallow": (0, 1, 2), "middle": (3, 4), "deep": (5, 6, 7)}
    assert parse_groups("G1=0-3,G2=2-5", MOE) == {"G1": (0, 1, 2, 3), "G2": (2, 3, 4, 5)}
    both = parse_groups("thirds;G1=0,7", MOE)
    assert both["G1"] == (0, 7) and both["deep"] == (5, 6, 7)
    assert parse_groups("none", MOE) == {}
    for bad in ("G1", "1G=0", "G1=0-9"):
        with pytest.raises(ConfigError):
            parse_groups(bad, MOE)
    assert parse_experts("top:6", 8) == "top:6" and parse_experts("expert:7", 8) == "expert:7"
    for bad in ("top:9", "expert:8", "some"):
        with pytest.raises(ConfigError):
            parse_experts(bad, 8)


def test_default_grid_has_layers_groups_model_and_baselines():
    spec = GridSpec(groups=thirds(MOE))
    points = build_points(spec, MOE, 8)
    # (8 layers + 3 groups + the whole model) x 2 codecs x 5 levels + 3 baselines
    assert len(points) == 12 * 2 * 5 + 3
    assert len({p.key for p in points}) == len(points)
    assert [p.codec for p in points[-3:]] == list(BASELINE_CODECS)
    assert all(p.target == "all" and p.level is None for p in points[-3:])
    assert {p.target_kind for p in points} == {"layer", "group", "model"}
    chosen = build_points(GridSpec(layers=(3,), levels=(1.0,)), MOE, 8)
    assert [p.target for p in chosen] == ["layer:3", "layer:3", "all", "all", "all"]


def test_baselines_are_one_whole_model_point_each():
    spec = GridSpec(codecs=("szp",), levels=(1.0,), baselines=("q4_k", "nf4"),
                    codec_options={"nf4": {"dq": False}})
    points = build_points(spec, MOE, 8)
    extra = [p for p in points if p.codec in ("q4_k", "nf4")]
    assert [(p.target, p.experts, p.level) for p in extra] == [("all", "all", None)] * 2
    assert dict(extra[1].codec_options) == {"dq": False}
    # a format already in --codecs is not measured twice
    both = build_points(GridSpec(codecs=("q4_k",), baselines=("q4_k",)), MOE, 8)
    assert len([p for p in both if p.codec == "q4_k" and p.target == "all"]) == 1


def test_formats_without_a_bound_get_one_point_per_target():
    """q4_k or nf4 in --codecs: no levels to sweep, one point per target (mode none)."""
    spec = GridSpec(codecs=("szp", "q4_k", "nf4"), levels=(1.0, 2.0), groups=thirds(MOE))
    points = build_points(spec, MOE, 8)
    fmt = [p for p in points if p.codec in ("q4_k", "nf4")]
    assert len(fmt) == 2 * 12 and all(p.mode == "none" and p.level is None for p in fmt)
    assert len([p for p in points if p.codec == "szp"]) == 12 * 2
    assert len({p.key for p in points}) == len(points)


def test_paper_design_matches_the_study_shape():
    assert paper_layers(tuple(range(1, 27))) == (1, 13, 20, 26)      # the study's layers of 26
    assert paper_groups(tuple(range(1, 27))) == {"G1": tuple(range(1, 11)),
                                                 "G2": tuple(range(9, 19)),
                                                 "G3": tuple(range(17, 27))}
    points = build_points(GridSpec(design="paper"), MOE, 8)
    assert {p.level for p in points} == {0.1, 0.3, 0.5, 0.8}
    noise = [p for p in points if p.surrogate == "gaussian"]
    real = [p for p in points if p.surrogate == "none"]
    assert len(noise) == len(real) and all(p.codec == "noise" and p.spec_codec == "szp"
                                           for p in noise)
    assert {p.experts for p in points} == {"top:1", "expert:0", "top:6", "all"}
    # 4 layers top-1, expert 0, top-6 of first and last, all of 4 layers, 3 groups = 14 targets
    assert len(points) == 14 * 4 * 2


def test_point_policy_perturbs_exactly_the_target():
    traces = __import__("pandas").DataFrame(
        {"layer": [2, 2, 2, 2, 5], "expert": [3, 3, 1, 3, 0]})
    top = top_experts(traces, MOE, 8)
    assert top[2][:2] == [3, 1] and top[5][0] == 0 and top[0] == list(range(8))
    points = {p.experts: p for p in build_points(
        GridSpec(design="paper", layers=(2,), groups={"G": (2, 5)}), MOE, 8) if p.level == 0.5
        and p.surrogate == "none" and p.target == "layer:2"}
    pol, sur = point_policy(points["top:1"], top, "fp")
    assert sur is None and set(pol.experts) == {(2, 3)} and not pol.layers
    assert pol.spec_for(2, 3).describe().startswith("szp:meanabs:0.5")
    assert pol.spec_for(2, 1).codec == "raw"
    pol, _ = point_policy(points["all"], top, "fp")
    assert set(pol.layers) == {2} and pol.spec_for(2, 7).codec == "szp"
    pol, _ = point_policy(points["expert:0"], top, "fp")
    assert set(pol.experts) == {(2, 0)}
    noisy = next(p for p in build_points(GridSpec(design="paper", layers=(2,)), MOE, 8)
                 if p.surrogate == "gaussian")
    pol, sur = point_policy(noisy, top, None)
    assert sur == "gaussian" and all(s.codec == "szp" for s in pol.experts.values())


@given(st.lists(st.tuples(st.floats(-0.5, 0.5), st.floats(0, 0.2), st.floats(0, 0.2)),
                min_size=1, max_size=6))
def test_mean_interval_contains_the_mean_and_shrinks_with_tasks(parts):
    changes = [(c, c - lo, c + hi) for c, lo, hi in parts]
    mean, low, high = mean_change_interval(changes)
    assert low <= mean + 1e-12 and mean <= high + 1e-12
    assert mean == pytest.approx(sum(c for c, _, _ in changes) / len(changes))
    # combining in quadrature is never wider than the widest task
    assert (high - low) <= max(h - l for _, l, h in changes) + 1e-12


def test_budget_warning():
    limit = {"metric": "content", "half_width": 0.012, "prompts_per_task": 300}
    assert "below the profile's detection limit" in budget_warning(limit, 0.01)
    assert budget_warning(limit, 0.02) is None
    assert budget_warning(limit, 0.001, metric="kl") is None
    assert not math.isnan(limit["half_width"])
