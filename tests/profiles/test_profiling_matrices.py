"""`profile model --per-matrix` (issue 17): points that perturb only gate_up or only down (real
codec round trips, the same paired intervals), ratios per matrix kind, the `matrix` column, and
profiles made before it loading as `all`."""

from __future__ import annotations

import pandas as pd
import pytest

from profiles.errors import ConfigError
from profiles.profiling import ProfileRequest, profile_model, read_profile
from profiles.profiling.format import RATIOS_FILE, SENSITIVITY_FILE
from profiles.profiling.grid import GridSpec, Point, build_points
from profiles.profiling.sensitivity import point_policy
from profiles.profiling.summary import ratio_table, sensitivity_table
from sim.ratios import RatioTable
from tests.profiles.test_profiling_model import _builtin_ready

TINY = dict(model="builtin", codecs="szp", levels="2", layers="3", groups="none", limit=8)


def test_grid_adds_a_gate_up_and_a_down_point_per_layer_group_and_level():
    spec = GridSpec(codecs=("szp",), levels=(1.0, 2.0), groups={"g": (0, 1)}, per_matrix=True)
    points = build_points(spec, (0, 1, 2), 4)
    only = [p for p in points if p.matrix != "all"]
    # (3 layers + 1 group) x 2 levels x 2 matrices; the whole model gets none
    assert len(only) == 16 and {p.matrix for p in only} == {"gate_up", "down"}
    assert not any(p.target == "all" for p in only)
    assert len({p.key for p in points}) == len(points)
    plain = build_points(GridSpec(codecs=("szp",), levels=(1.0, 2.0), groups={"g": (0, 1)}),
                         (0, 1, 2), 4)
    # whole-expert points keep their keys
    assert [p.key for p in plain] == [p.key for p in points if p.matrix == "all"]


def test_per_matrix_with_the_paper_design_is_refused():
    with pytest.raises(ConfigError, match="--per-matrix works with --design grid only"):
        build_points(GridSpec(design="paper", per_matrix=True), (0, 1, 2, 3), 4)


def test_a_matrix_point_perturbs_only_its_matrix():
    p = Point("layer:1", "layer", (1,), "all", "szp", "meanabs", 2.0, matrix="down")
    policy, surrogate = point_policy(p, {1: [0, 1]}, None)
    assert surrogate is None
    assert policy.spec_for(1, 0, "down").codec == "szp"
    assert policy.spec_for(1, 0, "gate_up").codec == "raw"
    assert policy.spec_for(0, 0, "down").codec == "raw"
    top = Point("layer:1", "layer", (1,), "top:1", "szp", "meanabs", 2.0, matrix="gate_up")
    policy, _ = point_policy(top, {1: [3, 0]}, None)
    assert policy.spec_for(1, 3, "gate_up").codec == "szp"
    assert policy.spec_for(1, 0, "gate_up").codec == "raw"
    assert policy.spec_for(1, 3, "down").codec == "raw"


@pytest.mark.skipif(not _builtin_ready(), reason="the built-in model's weights are not built")
def test_per_matrix_profile_of_the_builtin_model(tmp_path):
    out = tmp_path / "p"
    res = profile_model(ProfileRequest(out=out, per_matrix=True, command="pytest", **TINY))
    assert res.complete
    prof = read_profile(out)
    s = prof.sensitivity
    layer = s[s.target == "layer:3"]
    assert set(layer.matrix) == {"all", "gate_up", "down"}
    assert set(s[s.target == "all"].matrix) == {"all"}       # the baselines
    for m in ("gate_up", "down"):
        rows = layer[layer.matrix == m]
        assert rows.content_change_low.notna().all() and rows.content_mcnemar_p.notna().all()
        assert (rows.weights_unchanged == False).all()   # noqa: E712 (numpy bools)
    # each matrix's points perturbed different weights than the whole-layer point
    assert layer.groupby("matrix").weights_digest.first().nunique() == 3
    # ratios per matrix: the matrices' stored bytes add up to the expert's
    r = prof.ratios
    rows = r[(r.layer == 3) & (r.codec == "szp")].set_index("matrix")
    assert set(rows.index) == {"all", "gate_up", "down"}
    assert rows.loc["gate_up", "compressed_bytes_per_expert"] \
        + rows.loc["down", "compressed_bytes_per_expert"] == pytest.approx(
            rows.loc["all", "compressed_bytes_per_expert"])
    assert rows.loc["gate_up", "original_bytes_per_expert"] \
        + rows.loc["down", "original_bytes_per_expert"] == rows.loc["all",
                                                                   "original_bytes_per_expert"]
    table = RatioTable(r, "test")
    spec = type("S", (), {"codec": "szp", "mode": "meanabs", "level": 2.0,
                          "codec_options": {"variant": "fixed"}})()
    assert table.matrix_ratio(3, spec, None, "down") == pytest.approx(rows.loc["down", "ratio"])
    assert table.ratio(3, spec) == pytest.approx(rows.loc["all", "ratio"])
    assert table.matrix_kinds == ("down", "gate_up")
    # the summary tables name the matrix
    _, header, body = sensitivity_table(prof)
    assert header[2] == "matrix" and {row[2] for row in body} == {"all", "gate_up", "down"}
    _, header, body = ratio_table(prof)
    assert "matrix" in header


@pytest.mark.skipif(not _builtin_ready(), reason="the built-in model's weights are not built")
def test_a_profile_without_the_matrix_column_loads_as_all(tmp_path):
    out = tmp_path / "p"
    profile_model(ProfileRequest(out=out, command="pytest", **TINY))
    for name in (SENSITIVITY_FILE, RATIOS_FILE):   # as a profile made before the column
        frame = pd.read_parquet(out / name).drop(columns=["matrix"])
        frame.to_parquet(out / name, index=False)
    prof = read_profile(out)
    assert set(prof.sensitivity.matrix) == {"all"} and set(prof.ratios.matrix) == {"all"}
    from planner.modelprofile import load_profile

    assert set(load_profile(out).sensitivity.matrix) == {"all"}


def test_matrices_chooses_the_kinds_perturbed_one_at_a_time():
    from profiles.profiling.grid import parse_matrices

    assert parse_matrices("gate, up,down") == ("gate", "up", "down")
    spec = GridSpec(codecs=("szp",), levels=(1.0,), per_matrix=True,
                    matrices=parse_matrices("gate,up,down"))
    only = [p for p in build_points(spec, (0, 1), 4) if p.matrix != "all"]
    assert [(p.target, p.matrix) for p in only] == [
        (f"layer:{x}", m) for x in (0, 1) for m in ("gate", "up", "down")]
    assert "|matrix=gate" in only[0].key and "(gate only)" in only[0].describe()
    with pytest.raises(ConfigError, match=r"^--matrices: unknown matrix 'ffn'; valid matrices: "
                                          r"gate_up, down, gate, up \(e.g. --matrices "
                                          r"gate,up,down\)$"):
        parse_matrices("gate,ffn")


def test_a_gate_point_perturbs_gate_and_leaves_up_raw():
    p = Point("layer:1", "layer", (1,), "all", "szp", "meanabs", 2.0, matrix="gate")
    policy, _ = point_policy(p, {1: [0, 1]}, None)
    specs = policy.expert_specs(1, 0)
    assert (specs.gate.codec, specs.up.codec, specs.gate_up.codec, specs.down.codec) == \
        ("szp", "raw", "raw", "raw")
    assert specs.splits_gate_up


@pytest.mark.skipif(not _builtin_ready(), reason="the built-in model's weights are not built")
def test_gate_up_down_profile_of_the_builtin_model(tmp_path):
    out = tmp_path / "p"
    res = profile_model(ProfileRequest(out=out, matrices="gate,up,down", command="pytest",
                                       **TINY))
    assert res.complete
    prof = read_profile(out)
    assert prof.doc["per_matrix"] is True and prof.doc["matrices"] == ["gate", "up", "down"]
    layer = prof.sensitivity[prof.sensitivity.target == "layer:3"]
    assert set(layer.matrix) == {"all", "gate", "up", "down"}
    assert layer.groupby("matrix").weights_digest.first().nunique() == 4
    for m in ("gate", "up"):
        assert layer[layer.matrix == m].content_change_low.notna().all()
    # gate and up each get half of gate_up's values, and a ratio of their own blob's bytes
    r = prof.ratios
    rows = r[(r.layer == 3) & (r.codec == "szp")].set_index("matrix")
    assert set(rows.index) == {"all", "gate", "up", "down"}
    assert rows.loc["gate", "original_bytes_per_expert"] == \
        rows.loc["up", "original_bytes_per_expert"]
    assert rows.loc["gate", "original_bytes_per_expert"] * 2 \
        + rows.loc["down", "original_bytes_per_expert"] == pytest.approx(
            rows.loc["all", "original_bytes_per_expert"], abs=2)
    assert RatioTable(r, "test").matrix_kinds == ("down", "gate", "up")
    # asking again for gate_up too adds its points and ratio rows, and nothing twice
    res = profile_model(ProfileRequest(out=out, matrices="gate_up,gate,up,down",
                                       command="pytest", **TINY))
    prof = read_profile(out)
    r = prof.ratios
    rows = r[(r.layer == 3) & (r.codec == "szp")]
    assert sorted(rows.matrix) == ["all", "down", "gate", "gate_up", "up"]
    assert set(prof.sensitivity[prof.sensitivity.target == "layer:3"].matrix) == \
        {"all", "gate_up", "gate", "up", "down"}


def test_per_matrix_defaults_to_the_models_own_kinds():
    """--per-matrix without --matrices perturbs gate_up and down on a fused model, and gate, up
    and down on one that keeps them apart in memory (mixtral's w1/w3 modules), whose policy
    cannot name gate_up at all."""
    import dataclasses

    from profiles.profiling.profiler import _grid_spec
    from profiles.models import load_model

    fused = load_model("builtin").geometry
    req = ProfileRequest(model="builtin", out="unused", codecs="szp", levels="1",
                         per_matrix=True)
    assert _grid_spec(req, fused).matrices == ("gate_up", "down")
    apart = dataclasses.replace(fused, expert_tensor_shapes=(
        ("w1.weight", (256, 128)), ("w2.weight", (128, 256)), ("w3.weight", (256, 128))),
        architecture="mixtral")
    assert _grid_spec(req, apart).matrices == ("gate", "up", "down")
