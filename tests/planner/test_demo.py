"""`moesz demo` end to end at the reduced `ci` size: every stage runs for real on the built-in
model and leaves its files; the summary labels its figures."""

from __future__ import annotations

import json

import pytest

from planner.demo import SIZES, STAGES, run_demo, summary_lines
from profiles.errors import ConfigError
from tests.planner.demo_folder import demo_folder

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_folder(tmp_path_factory)


@pytest.mark.slow
def test_demo_writes_every_stage_file(demo):
    out, record, _ = demo
    for name in ("profile/profile.json", "profile/ratios.parquet", "profile/sensitivity.parquet",
                 "profile/traces.parquet", "plan.json", "plan-plots/pareto.png", "sweep.json",
                 "timeline.json", "validation.json", "demo.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert set(record["stages_s"]) == set(STAGES)
    assert record["wall_s"] >= sum(record["stages_s"].values()) * 0.99


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only stage")
def test_demo_serves_the_plan_on_this_cpu_beside_both_predictions(demo):
    out, record, _ = demo
    lines = summary_lines(record, out)
    doc = json.loads((out / "this-machine.json").read_text())
    assert [r["policy"] for r in doc["rows"]] == ["plan", "no compression"]
    for r in doc["rows"]:
        assert r["measured_tokens_per_s"] > 0 and r["predicted_here_tokens_per_s"] > 0
        assert r["predicted_gpu_tokens_per_s"] > 0 and r["bytes_disk"] > 0
        assert r["bytes_disk"] == r["predicted_bytes_disk"]   # the disk tier, read as predicted
    assert (out / "this-machine" / "hardware.json").is_file()
    text = "\n".join(lines)
    assert "measured" in text and "predicted for this machine" in text
    assert "predicted for preset:h200-published" in text


@pytest.mark.slow
def test_demo_chain_is_consistent(demo):
    out, record, _ = demo
    plan = json.loads((out / "plan.json").read_text())
    profile = json.loads((out / "profile" / "profile.json").read_text())
    val = json.loads((out / "validation.json").read_text())
    # one model throughout: profile -> plan -> validation
    assert plan["model"]["fingerprint"] == profile["model"]["fingerprint"]
    assert val["model"]["fingerprint"] == plan["model"]["fingerprint"]
    assert plan["budget"]["value"] == SIZES["ci"].budget
    # the plan's GPU budget forces misses: at the plan's budget the simulated hit rate is < 1
    sweep = json.loads((out / "sweep.json").read_text())
    plan_rows = [r for r in sweep["rows"] if r["policy"] == "plan"]
    assert len(plan_rows) == len(SIZES["ci"].sweep_fractions)
    assert min(r["hit_rate"] for r in plan_rows) < 1.0
    assert any(r["policy"] == "no compression" for r in sweep["rows"])
    # validation evaluated every task on the validate split, paired
    assert val["split"] == "validate" and val["limit"] == SIZES["ci"].validate_limit
    assert val["verdict"] in ("held", "violated", "inconclusive")
    assert val["n_prompts"] == 4 * SIZES["ci"].validate_limit
    trace = json.loads((out / "timeline.json").read_text())
    assert trace["traceEvents"]


@pytest.mark.slow
def test_without_gpu_the_demo_says_it_used_the_preset(demo):
    import torch

    out, record, _ = demo
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the demo measures the hardware instead")
    assert record["hardware"]["spec"] == "preset:h200-published"
    assert "preset" in record["hardware"]["note"] and "not measured" in record["hardware"]["note"]
    assert "preset:h200-published" in (out / "report.md").read_text()


@pytest.mark.slow
def test_progress_covers_every_stage_in_order(demo):
    _, _, calls = demo
    seen = []
    for _, _, label in calls:
        name = label.split("] ", 1)[1].split(":", 1)[0]
        if not seen or seen[-1] != name:
            seen.append(name)
    assert seen == list(STAGES)


@pytest.mark.slow
def test_summary_labels_every_figure(demo):
    out, record, _ = demo
    lines = summary_lines(record, out)
    text = "\n".join(lines)
    assert "predicted" in text and "measured" in text and "preset" in text
    for line in lines:
        if any(ch.isdigit() for ch in line) and "tokens/s" in line:
            assert "predicted" in line or "closed form" in line or "simulation" in line, line


def test_unknown_size_and_file_as_folder_refused(tmp_path):
    with pytest.raises(ConfigError, match="size"):
        run_demo(tmp_path, size="huge")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run_demo(f, size="ci")


def test_demo_refuses_a_budget_or_text_it_cannot_measure(tmp_path):
    from planner.demo import DemoMetrics

    with pytest.raises(ConfigError, match="will not have metric 'gsm8k'; it will have content"):
        run_demo(tmp_path / "d", size="ci", metrics=DemoMetrics(budget="gsm8k=0.02"))
    with pytest.raises(ConfigError, match="perplexity-ratio budget is at least 1"):
        run_demo(tmp_path / "d", size="ci", metrics=DemoMetrics(budget="ppl=0.5"))
    with pytest.raises(ConfigError, match="no such file"):
        run_demo(tmp_path / "d", size="ci", metrics=DemoMetrics(text=str(tmp_path / "no.txt")))
    with pytest.raises(ConfigError, match="character tokenizer cannot run lm-evaluation"):
        run_demo(tmp_path / "d", size="ci", metrics=DemoMetrics(lm_eval="hellaswag"))
    assert not (tmp_path / "d").exists()   # refused before anything was written


def test_demo_cli_refuses_lm_eval_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--size", "ci",
                                 "--lm-eval", "hellaswag"])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "--lm-eval hellaswag" in lines[0], r.output
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_plans_on_a_kl_budget(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--size", "ci",
                                 "--budget", "kl=0.05"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "d" / "plan.json").read_text())
    val = json.loads((tmp_path / "d" / "validation.json").read_text())
    assert plan["budget"]["metric"] == "kl" and val["metric"] == "kl"
    assert "kl drop: predicted" in r.output and "text's validate half" in r.output
    assert "corpus.txt, validate half" in val["measured"]["text"]["corpus"]   # the shipped one
    assert val["measured"]["accuracy_drop"] == val["measured"]["text"]["kl_nats"]


@pytest.mark.slow
def test_demo_compares_with_the_formats_users_run(demo):
    from planner.demo import USER_FORMATS

    out, record, _ = demo
    plan = json.loads((out / "plan.json").read_text())
    base = {b["name"]: b for b in plan["baselines"]}
    users = {name[8:].split(",")[0]: b for name, b in base.items()
             if name.startswith("uniform ") and name[8:].split(",")[0] in USER_FORMATS}
    assert set(users) == set(USER_FORMATS.split(","))
    for name, b in users.items():
        # bytes of the real encodes, accuracy from the profile's whole-model point, tokens/s
        assert b["host_bytes"] > 0 and b["tokens_per_s"] > 0, name
        assert b["accuracy_drop"]["kind"].startswith("measured"), name
        assert b["accuracy_drop"]["low"] <= b["accuracy_drop"]["value"] <= \
            b["accuracy_drop"]["high"]
    # Q3_K stores fewer bytes than Q4_K, NF4 and MXFP4 (3.44 bits a weight against 4.1-4.5)
    assert users["q3_k"]["host_bytes"] < min(users[f]["host_bytes"]
                                             for f in ("q4_k", "nf4", "mxfp4"))
    assert "best user format" in base
    text = "\n".join(summary_lines(record, out))
    assert "formats users run" in text and "best user format" in text
    assert "rtn4 (per-row absmax)" in text
