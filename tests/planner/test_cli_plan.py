"""`moesz plan` and `moesz plan show` through typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app
from tests.planner.planner_fixtures import tiny_profile

runner = CliRunner()


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    prof = tiny_profile(tmp_path_factory.mktemp("prof"))
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    r = runner.invoke(app, ["plan", "--profile", str(prof), "--hardware", "preset:h200-published",
                            "--accuracy-budget", "0.01", "--gpu-mem", "25%", "--tokens", "64",
                            "--trials", "20", "--warm-trials", "2", "--rerank", "1",
                            "--out", str(out)])
    return prof, out, r


def test_plan_writes_a_plan_and_plots(planned):
    _, out, r = planned
    assert r.exit_code == 0, r.output
    assert out.is_file() and "wrote" in r.output and "plan" in r.output
    for name in ("pareto.png", "levels.png", "budget.png"):
        assert (out.parent / "plan-plots" / name).stat().st_size > 1000
    assert "predicted" in r.output and "MILP optimum" in r.output


def test_plan_show_json_has_the_documented_fields(planned):
    _, out, _ = planned
    r = runner.invoke(app, ["plan", "show", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert all({"layer", "codec", "level"} <= set(x) for x in doc["layers"])
    assert isinstance(doc["predicted"]["tokens_per_s"], float)
    assert {"value", "low", "high"} <= set(doc["predicted"]["accuracy_drop"])
    assert doc["budget"]["value"] == 0.01 and doc["budget"]["metric"] == "content"
    assert all("tokens_per_s" in b and "accuracy_drop" in b for b in doc["baselines"])
    r = runner.invoke(app, ["plan", "show", str(out)])
    assert r.exit_code == 0 and "baselines" not in r.output.lower().split("plan")[0]
    assert "no compression" in r.output


def test_errors_are_one_line(planned, tmp_path):
    prof, _, _ = planned
    r = runner.invoke(app, ["plan", "--profile", str(prof), "--accuracy-budget", "-1",
                            "--gpu-mem", "25%", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "error: --accuracy-budget" in r.output
    r = runner.invoke(app, ["plan", "--accuracy-budget", "0.01", "--gpu-mem", "25%",
                            "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "error: --profile is required" in r.output
    r = runner.invoke(app, ["plan", "show", str(tmp_path / "nope.json")])
    assert r.exit_code == 1 and "error:" in r.output and "no such file" in r.output
    r = runner.invoke(app, ["plan", "--profile", str(tmp_path), "--accuracy-budget", "0.01",
                            "--gpu-mem", "25%", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "profile.json" in r.output


def test_synthetic_profile_command(tmp_path):
    out = tmp_path / "syn"
    r = runner.invoke(app, ["plan", "synthetic-profile", "builtin", "--out", str(out),
                            "--levels", "0.5,1"])
    assert r.exit_code == 0, r.output
    assert "not measured on a model" in r.output
    doc = json.loads((out / "profile.json").read_text())
    assert doc["synthetic"] is True and doc["model"]["fingerprint"].startswith("synthetic:")
    from planner.modelprofile import load_profile

    prof = load_profile(out)
    assert prof.synthetic and len(prof.geometry.moe_layers) == 8
    assert set(prof.ratio_rows["source"]) == {"synthetic"}
    r = runner.invoke(app, ["plan", "synthetic-profile", "builtin", "--out", str(out),
                            "--levels", "a,b"])
    assert r.exit_code == 1 and "error: --levels" in r.output


def test_plan_placement_traces(planned, tmp_path):
    """Static-hot plans rank pinned experts by --placement-traces and record it; by default the
    plan says its placement is the oracle's."""
    import pandas as pd

    prof, _, _ = planned
    traces = pd.read_parquet(prof / "traces.parquet")
    E = int(traces["expert"].max()) + 1
    shifted = tmp_path / "other.parquet"
    traces.assign(expert=E - 1 - traces["expert"]).to_parquet(shifted)  # hot experts turn cold
    docs = []
    for extra in ((), ("--placement-traces", str(shifted))):
        out = tmp_path / f"plan{len(docs)}.json"
        r = runner.invoke(app, ["plan", "--profile", str(prof), "--accuracy-budget", "0.01",
                                "--gpu-mem", "25%", "--cache", "static-hot", "--tokens", "64",
                                "--trials", "10", "--warm-trials", "0", "--rerank", "1",
                                "--no-plots", "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        docs.append(json.loads(out.read_text()))
    oracle, placed = (d["predicted"] for d in docs)
    assert "oracle" in oracle["static_placement_ranked_by"]
    assert placed["static_placement_ranked_by"] == str(shifted)
    assert placed["tokens_per_s_closed_form"] < oracle["tokens_per_s_closed_form"]


@pytest.mark.parametrize("extra, message", [
    (("--storage", "notaurl"), "storage 'notaurl' is not a URL"),
    (("--warm-trials", "-1"), "--warm-trials -1 must be >= 0"),
    (("--rerank", "-1"), "--rerank -1 must be >= 0"),
])
def test_bad_search_options_are_one_line(planned, tmp_path, extra, message):
    prof, _, _ = planned
    r = runner.invoke(app, ["plan", "--profile", str(prof), "--accuracy-budget", "0.01",
                            "--gpu-mem", "25%", "--trials", "5", "--no-plots",
                            "--out", str(tmp_path / "p.json"), *extra])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p.json").exists()


def test_bad_output_paths_fail_before_planning(planned, tmp_path):
    prof, _, _ = planned
    base = ["plan", "--profile", str(prof), "--accuracy-budget", "0.01", "--gpu-mem", "25%",
            "--trials", "5"]
    r = runner.invoke(app, base + ["--out", str(tmp_path)])
    assert r.exit_code == 1 and "--out" in r.output and "is a directory" in r.output
    (tmp_path / "plots-file").write_text("keep")
    r = runner.invoke(app, base + ["--out", str(tmp_path / "p.json"), "--plots",
                                   str(tmp_path / "plots-file")])
    assert r.exit_code == 1 and "--plots" in r.output and "is a file" in r.output
    assert not (tmp_path / "p.json").exists()  # checked before the plan was written
    assert (tmp_path / "plots-file").read_text() == "keep"
