"""Validation: the verdict logic on constructed cases, then real validation on the built-in model."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.verdict import Interval, TaskChange, decide, mean_change, negate
from profiles.errors import MoeszError

NEWCOMBE = "newcombe-paired"


def _drop(value, low, high):
    return Interval(value, low, high, "test")


# --- the three verdicts on constructed cases -------------------------------------------------

def test_held_when_upper_end_within_budget():
    v = decide(_drop(0.002, -0.004, 0.009), 0.01)
    assert v.verdict == "held" and v.more_prompts is None
    assert "upper end" in v.reason


def test_held_at_exact_budget_edge():
    assert decide(_drop(0.0, -0.01, 0.01), 0.01).verdict == "held"


def test_violated_when_lower_end_beyond_budget():
    v = decide(_drop(0.05, 0.02, 0.08), 0.01)
    assert v.verdict == "violated" and "lower end" in v.reason


def test_inconclusive_sizes_more_prompts_by_inverse_square_law():
    # estimate 0.0 below budget 0.01; upper end 0.02 is 0.02 away -> need (0.02 / 0.01)^2 = 4x.
    changes = [TaskChange("add", 100, Interval(0.0, -0.02, 0.02, NEWCOMBE))]
    v = decide(_drop(0.0, -0.02, 0.02), 0.01, changes)
    assert v.verdict == "inconclusive"
    assert v.more_prompts == 300 and v.more_prompts_per_task == {"add": 300}
    d = v.to_dict()
    assert d["more_prompts"]["total"] == 300 and d["more_prompts"]["source"] == "estimated"


def test_inconclusive_above_budget_uses_lower_end():
    # estimate 0.03 above budget 0.01: lower end 0.0 is 0.03 below the estimate, gap 0.02
    changes = [TaskChange("a", 50, Interval(-0.03, -0.06, 0.0, NEWCOMBE)),
               TaskChange("b", 150, Interval(-0.03, -0.06, 0.0, NEWCOMBE))]
    v = decide(_drop(0.03, 0.0, 0.06), 0.01, changes)
    factor = (0.03 / 0.02) ** 2
    assert v.verdict == "inconclusive"
    assert v.more_prompts_per_task == {"a": math.ceil(50 * factor) - 50,
                                       "b": math.ceil(150 * factor) - 150}


def test_inconclusive_on_the_budget_has_no_finite_projection():
    v = decide(_drop(0.01, 0.0, 0.02), 0.01, [TaskChange("a", 10, Interval(-0.01, -0.02, 0.0, "x"))])
    assert v.verdict == "inconclusive" and v.more_prompts is None


def test_negative_budget_refused():
    with pytest.raises(MoeszError, match="budget"):
        decide(_drop(0.0, -0.01, 0.01), -0.01)


def test_disordered_interval_refused():
    with pytest.raises(MoeszError, match="low <= value"):
        decide(Interval(0.5, 0.6, 0.7, "x"), 0.01)


# --- averaging over tasks (MOVER) ------------------------------------------------------------

def test_mean_of_one_task_is_that_task():
    iv = Interval(-0.1, -0.2, 0.05, NEWCOMBE)
    assert mean_change([TaskChange("add", 40, iv)]) == iv


def test_mover_mean_of_identical_tasks_narrows_by_sqrt_t():
    iv = Interval(-0.1, -0.2, 0.02, NEWCOMBE)
    m = mean_change([TaskChange(t, 40, iv) for t in "abcd"])
    assert m.value == pytest.approx(-0.1)
    assert m.value - m.low == pytest.approx(0.1 / 2)   # sqrt(4 * 0.1^2) / 4
    assert m.high - m.value == pytest.approx(0.12 / 2)
    assert "MOVER" in m.method and NEWCOMBE in m.method


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-0.5, 0.5), st.floats(0, 0.3), st.floats(0, 0.3)),
                min_size=1, max_size=6))
def test_mover_interval_contains_mean_and_is_no_wider_than_average_width(rows):
    changes = [TaskChange(str(i), 10, Interval(v, v - a, v + b, NEWCOMBE))
               for i, (v, a, b) in enumerate(rows)]
    m = mean_change(changes)
    assert m.low <= m.value <= m.high
    mean_lo = sum(v - (v - a) for v, a, _ in rows) / len(rows)
    mean_hi = sum(b for _, _, b in rows) / len(rows)
    # quadrature never exceeds the plain sum of distances
    assert m.value - m.low <= mean_lo + 1e-12
    assert m.high - m.value <= mean_hi + 1e-12


@settings(max_examples=100, deadline=None)
@given(st.floats(-0.2, 0.2), st.floats(0.0, 0.1), st.floats(0.0, 0.1), st.floats(0.0, 0.1))
def test_verdicts_partition_the_cases(value, a, b, budget):
    drop = Interval(value, value - a, value + b, "x")
    v = decide(drop, budget, [TaskChange("t", 20, negate(drop))]).verdict
    assert v == ("held" if drop.high <= budget else "violated" if drop.low > budget
                 else "inconclusive")


# --- constructed per-prompt outcomes through the real paired statistics -----------------------

def _task(name, n, lost, gained=0):
    from profiles.evaluation import compare_paired

    base = [True] * (n - gained) + [False] * gained
    plan = [i >= lost for i in range(n - gained)] + [True] * gained
    return TaskChange(name, n, compare_paired(base, plan).change)


def test_constructed_outcomes_give_each_verdict():
    held = [_task(t, 1000, 0) for t in ("add", "sub", "sort", "reverse")]
    assert decide(negate(mean_change(held)), 0.01, held).verdict == "held"
    bad = [_task(t, 400, 40) for t in ("add", "sub", "sort", "reverse")]
    assert decide(negate(mean_change(bad)), 0.01, bad).verdict == "violated"
    few = [_task(t, 50, 1) for t in ("add", "sub", "sort", "reverse")]
    v = decide(negate(mean_change(few)), 0.01, few)
    assert v.verdict == "inconclusive" and v.more_prompts > 0


# --- real validation on the built-in model (shares the session's ci demo run) ----------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from tests.planner.demo_folder import demo_folder

    return demo_folder(tmp_path_factory)


@pytest.mark.slow
def test_validation_on_builtin_model(demo, tmp_path):
    from planner.validate import validate_plan

    out, _, _ = demo
    plan = json.loads((out / "plan.json").read_text())
    doc = validate_plan(out / "plan.json", limit=4, tasks=["add", "sort"], cache_dir=tmp_path)
    assert doc["split"] == "validate" and doc["n_prompts"] == 8
    assert set(doc["measured"]["tasks"]) == {"add", "sort"}
    for side in ("measured", "predicted"):
        iv = doc[side]["accuracy_drop"]
        assert set(iv) >= {"value", "low", "high", "method"} and iv["low"] <= iv["high"]
    assert doc["budget"] == plan["budget"]
    assert doc["predicted"]["accuracy_drop"]["value"] == plan["predicted"]["accuracy_drop"]["value"]
    # the policy really went through the codecs: compressed layers store fewer bytes
    m = doc["measured"]
    assert m["original_bytes"] > 0
    compressed = any(x["codec"] != "raw" for x in plan["layers"])
    assert (m["stored_bytes"] < m["original_bytes"]) == compressed
    expected = decide(Interval(**{k: m["accuracy_drop"][k] for k in ("value", "low", "high")},
                               method="x"), plan["budget"]["value"]).verdict
    assert doc["verdict"] == expected
    # the baseline was cached and is reused
    assert list(tmp_path.glob("baseline-*.json"))


@pytest.mark.slow
def test_plan_for_another_model_is_refused(demo, tmp_path):
    from planner.validate import validate_plan
    from profiles.errors import PlanError

    out, _, _ = demo
    doc = json.loads((out / "plan.json").read_text())
    other = "fp2:0123456789abcdef"
    doc["model"]["fingerprint"] = doc["policy"]["fingerprint"] = other
    path = tmp_path / "other.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=f"fingerprint {other}"):
        validate_plan(path, limit=2, tasks=["add"], cache_dir=tmp_path)


@pytest.mark.slow
def test_cli_validate_json_keys(demo, tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    out, _, _ = demo
    res = CliRunner().invoke(app, ["validate", str(out / "plan.json"), "--limit", "2", "--tasks",
                                   "add", "--cache-dir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    assert {"measured", "predicted", "budget", "verdict"} <= set(doc)
    assert doc["verdict"] in ("held", "violated", "inconclusive")


def test_cli_validate_missing_plan_is_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    res = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.json")])
    assert res.exit_code == 1
    assert "error:" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_throughput_check_on_cpu_compares_traffic_not_timings():
    """`validate --throughput` without a GPU: the runtime runs on the CPU; bytes moved and misses
    follow from routing, cache and sizes and must agree with the simulator; the timings are
    labelled not comparable instead of being given a meaningless error."""
    from planner.throughput import check_throughput
    from profiles.policy import Policy
    from profiles.serving import ServingConfig, parse_mem

    serving = ServingConfig(prompt_tokens=4, generated_tokens=4).with_budgets(
        parse_mem("25%"), None)
    doc = check_throughput("builtin", Policy.uniform("szp", "meanabs", 1.0), serving,
                           "preset:h200-published", device="cpu")
    rows = {r["field"]: r for r in doc["comparison"]}
    assert rows["misses"]["measured"] > 0
    for field in ("bytes_h2d", "misses", "transfers"):
        assert rows[field]["comparable"] and rows[field]["relative_error"] == 0.0, field
    for field in ("tokens_per_s", "tpot_s"):
        assert not rows[field]["comparable"] and rows[field]["relative_error"] is None
    assert any("another device: tokens/s and time per token are not compared" in n
               for n in doc["notes"])


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only report")
def test_validate_throughput_without_a_gpu_reports_three_labelled_figures(tmp_path):
    """On a CPU: the plan and no compression measured here with the disk tier forced, each beside
    the prediction for this machine and the H200 preset's."""
    import json

    from typer.testing import CliRunner

    from planner.cli import app

    res = CliRunner().invoke(app, ["validate", "--throughput", "--model", "builtin", "--uniform",
                                   "szp:meanabs:1", "--tokens", "6", "--prompt", "4",
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)["this_machine"]
    assert [r["policy"] for r in doc["rows"]] == ["plan", "no compression"]
    for r in doc["rows"]:
        assert r["measured_tokens_per_s"] > 0 and r["predicted_here_tokens_per_s"] > 0
        assert r["predicted_gpu_tokens_per_s"] > 0 and r["bytes_disk"] > 0
    assert doc["hardware_gpu"]["spec"] == "preset:h200-published"
    assert set(doc["labels"]) == {"measured_tokens_per_s", "predicted_here_tokens_per_s",
                                  "predicted_gpu_tokens_per_s"}


@pytest.mark.slow
def test_validation_with_experts_on_disk_measures_what_memory_does(demo, tmp_path):
    """--host-mem: the plan validated with the experts served from disk under a small host
    budget; same measured accuracies as in memory at the same (bf16) arithmetic."""
    from planner.validate import validate_plan

    out, _, _ = demo
    doc = validate_plan(out / "plan.json", limit=4, tasks=["sort"], cache_dir=tmp_path,
                        host_mem=200_000)
    d = doc["experts_from_disk"]
    assert d["expert_reads"] > 0 and d["host_peak_bytes"] <= 200_000
    assert "model's own dtype" in doc["compute"]
    assert doc["measured"]["stored_bytes"] < doc["measured"]["original_bytes"]
