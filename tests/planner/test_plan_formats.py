"""The formats users run (gq, nf4, mxfp4, GGUF k-quants) and `ans` as planner choices, and the
`best user format` baseline: ratios by codec options, labels, estimated decode speeds, the MILP."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from planner.accuracy import AccuracyModel, spec_label
from planner.pipeline import PlanRequest, make_plan
from profiles.errors import ConfigError, PolicyError
from profiles.hardware import load_hardware
from profiles.policy import Policy, StorageSpec
from profiles.serving import ServingConfig
from sim.costs import ANS_ESTIMATE_GBPS, build_costs, estimated_gpu_rate
from sim.ratios import RatioTable, SyntheticRatios
from tests.planner.planner_fixtures import tiny_geometry

FORMATS = ("nf4", "q4_k", "q3_k", "gq,bits=3,group=128")


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    from planner.synthetic import write_synthetic_profile

    return write_synthetic_profile(
        tiny_geometry(4), tmp_path_factory.mktemp("fmt") / "prof", codecs=("szp", *FORMATS),
        levels=(0.1, 0.3, 1.0), tasks=("a", "b"), prompts_per_task=2000, trace_prompts=2,
        trace_prompt_tokens=4, trace_decode_tokens=32, max_values=4096)


def _plan(profile, tmp_path, budget=0.01, codecs=None, **kw):
    serving = ServingConfig(generated_tokens=32, prompt_tokens=4, gpu_mem_fraction=0.25)
    req = PlanRequest(profile=str(profile), hardware="preset:h200-published", budget=budget,
                      serving=serving, trials=30, warm_trials=5, rerank=1, codecs=codecs, **kw)
    return make_plan(req, out=str(tmp_path / "plan.json"))


def test_ratio_table_keys_formats_by_their_options():
    rows = pd.DataFrame([
        {"layer": 0, "codec": "gq", "mode": "none", "level": np.nan,
         "codec_options": json.dumps({"bits": 3}), "ratio": 4.5},
        {"layer": 0, "codec": "nf4", "mode": "none", "level": np.nan, "codec_options": "{}",
         "ratio": 3.8},
        {"layer": 0, "codec": "szp", "mode": "meanabs", "level": 1.0, "codec_options": "{}",
         "ratio": 5.5}])
    t = RatioTable(rows, "test")
    assert t.ratio(0, StorageSpec.parse("gq,bits=3,group=64")) == 4.5
    assert t.ratio(0, StorageSpec.parse("nf4")) == 3.8
    assert t.ratio(0, StorageSpec("szp", "meanabs", 1.0)) == 5.5
    with pytest.raises(PolicyError, match="no ratio for codec 'gq'"):
        t.ratio(0, StorageSpec.parse("gq,bits=4"))  # another format than the one measured


def test_synthetic_ratios_measure_formats_without_a_level():
    g = tiny_geometry(1)
    r = SyntheticRatios().ratio(0, StorageSpec.parse("q4_k"), g)
    # Q4_K: 144 bytes per 256 values = 4.5 bits against bf16's 16 (plus a small blob header)
    assert 3.4 < r < 16 / 4.5 + 1e-9


def test_accuracy_labels_carry_the_profiled_codec_options():
    assert spec_label("gq", "none", float("nan"), '{"bits": 3}') == "gq,bits=3,group=64"
    assert spec_label("gq", "none", None, None) == "gq,bits=4,group=64"
    assert spec_label("szp", "meanabs", 1.0, "{}") == StorageSpec("szp", "meanabs", 1).describe()


def test_user_formats_get_estimated_gpu_speeds_and_ans_is_no_longer_refused():
    hw = load_hardware("preset:h200-published")
    half = hw.gpu.d2d_gbps.value / 2
    assert estimated_gpu_rate(hw, "q4_k")[0] == half
    gbps, how = estimated_gpu_rate(hw, "ans")
    assert gbps == min(ANS_ESTIMATE_GBPS, half) and "estimated" in how and "DietGPU" in how
    assert estimated_gpu_rate(hw, "sz3") is None        # CPU only: no GPU estimate
    g = tiny_geometry(2)
    costs = build_costs(g, Policy.uniform("ans", "meanabs", 1.0), hw,
                        ServingConfig(gpu_mem_fraction=0.25), SyntheticRatios())
    assert (costs.gpu_decode_s > 0).all()
    assert any(lab.startswith("ans GPU decode: estimated") for lab in costs.labels)
    # time = values * 2 bytes / rate  (bf16 output of one expert)
    params = costs.original_bytes / 2
    assert costs.gpu_decode_s[0, 0] == pytest.approx(2 * params / (gbps * 1e9))


def test_formats_are_planner_choices_and_the_milp_is_the_optimum(profile, tmp_path):
    o = _plan(profile, tmp_path)
    labels = set(o.table.labels)
    assert {"nf4,dq=True", "q4_k", "q3_k", "gq,bits=3,group=128"} <= labels
    assert "rtn4" not in labels and "rtn8" not in labels       # baselines, not searched
    # the MILP optimum is at least as fast as every feasible assignment in the table; check it
    # against brute force over the 4-layer table
    from tests.planner.test_plan import brute_force

    ref = brute_force(np.where(o.table.available, o.table.layer_s, np.inf),
                      np.nan_to_num(o.table.mu), np.nan_to_num(o.table.var),
                      o.accuracy.constraint(0.01))
    assert o.milp.cost == pytest.approx(ref[0], rel=1e-9)
    doc = o.plan.doc
    assert any("q4_k GPU decode: estimated as half the d2d" in n for n in doc["notes"])


def test_best_user_format_is_the_fastest_feasible_uniform_format(profile, tmp_path):
    o = _plan(profile, tmp_path, budget=0.02)
    by = {b.name: b for b in o.baselines}
    users = [b for name, b in by.items() if name.startswith("uniform ")
             and name[8:].split(",")[0] in ("nf4", "q4_k", "q3_k", "gq")]
    assert len(users) == 4
    feasible = [b for b in users if b.feasible]
    best = by["best user format"]
    assert feasible, "the synthetic profile should have a feasible user format at 0.02"
    want = max(feasible, key=lambda b: b.tokens_per_s)
    assert best.policy == want.policy and best.tokens_per_s == want.tokens_per_s
    assert best.drop == want.drop
    from planner.baselines import uniform_spec

    assert best.label == f"best user format: {uniform_spec(want.policy)}"
    assert best.label.split(": ")[1].split(",")[0] in ("nf4", "q4_k", "q3_k", "gq")
    rows = {b["name"]: b for b in o.plan.doc["baselines"]}
    assert rows["rtn4"]["label"] == "rtn4 (per-row absmax)"
    assert rows["best user format"]["accuracy_drop"]["value"] == pytest.approx(want.drop.drop)
    # the plan is never predicted slower than the best user format (it is a candidate)
    assert o.plan.doc["predicted"]["tokens_per_s_closed_form"] >= best.tokens_per_s * (1 - 1e-9)


def test_user_formats_outside_the_searched_codecs_still_appear_as_baselines(profile, tmp_path):
    o = _plan(profile, tmp_path, budget=0.02, codecs=("szp",))
    names = {b.name for b in o.baselines}
    assert {"uniform nf4,dq=True", "uniform q4_k", "uniform q3_k",
            "uniform gq,bits=3,group=128", "best user format"} <= names
    assert set(o.table.labels) == {"raw"} | {lab for lab in o.table.labels if
                                             lab.startswith("szp")}


def test_no_user_format_meets_a_zero_budget(profile, tmp_path):
    from planner.baselines import compute_baselines
    from planner.modelprofile import load_profile

    o = _plan(profile, tmp_path, budget=0.02)
    prof = load_profile(str(profile))
    out = compute_baselines(table=o.table, evaluate=lambda c: 1.0, accuracy=o.accuracy,
                            constraint=o.accuracy.constraint(0.0), geometry=prof.geometry,
                            ratios=prof.ratios, hardware=load_hardware("preset:h200-published"),
                            serving=o.plan.serving, closed_form=o.closed_form,
                            codecs=tuple(o.plan.doc["codecs"]))
    best = next(b for b in out if b.name == "best user format")
    assert best.policy is None and not best.feasible
    assert "no uniform format users run meets the budget" in best.note
    assert best.label == "best user format"


def test_unknown_codec_in_codecs_is_one_line(profile, tmp_path):
    with pytest.raises(ConfigError, match="no single-layer sensitivity rows for mxfp4"):
        _plan(profile, tmp_path, codecs=("mxfp4",))
