"""A user's own checkpoint through profile -> plan -> validate on the metrics the user chooses: a
random-initialised Mixtral-style checkpoint with a locally built Hugging Face tokenizer, a JSONL
benchmark and a text corpus, budgets on kl, ppl, content and the benchmark by name."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from planner.cli import app
from tests.profiles.eval_helpers import one_torch_thread, save_text_checkpoint  # noqa: F401

runner = CliRunner()
WORDS = "the cat sat on a mat and then it ran to see what was there by the sea".split()


def _files(root):
    rng = random.Random(0)
    text = root / "corpus.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 50)))
                                + "." for _ in range(50)), encoding="utf-8")
    bench = root / "sums.jsonl"
    with bench.open("w") as fh:
        for _ in range(40):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            fh.write(json.dumps({"question": f"what is {a} plus {b}?",
                                 "answer": f"{a}+{b} #### {a + b}"}) + "\n")
    return text, bench


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    ckpt = save_text_checkpoint("mixtral", root / "ckpt")
    text, bench = _files(root)
    out = root / "prof"
    r = runner.invoke(app, ["profile", "model", str(ckpt), "--out", str(out), "--codecs", "szp",
                            "--levels", "1,3", "--limit", "8", "--max-new-tokens", "6",
                            "--bench", str(bench), "--text", str(text), "--text-tokens", "1500"])
    assert r.exit_code == 0, r.output
    return root, ckpt, out, text, bench


def test_profile_records_its_metrics_and_split(profiled):
    _, _, out, text, bench = profiled
    doc = json.loads((out / "profile.json").read_text())
    m = doc["metrics"]
    assert m["available"] == ["content", "strict", "kl", "ppl", "sums"]
    assert m["builtin_tasks"] == [] and doc["tasks"] == ["sums"]
    assert m["text"]["path"] == str(text.resolve()) and len(m["text"]["sha256"]) == 64
    assert "blake2b" in m["split_method"]
    # the command as given: a repeatable option once per value, an absent one not at all
    assert f"--bench {bench}" in doc["command"] and "()" not in doc["command"]
    assert "--lm-eval" not in doc["command"]
    import pandas as pd

    sens = pd.read_parquet(out / "sensitivity.parquet")
    lossy = sens[sens.codec == "szp"]
    assert (lossy.kl_nats > 0).all() and (lossy.kl_low <= lossy.kl_nats).all()
    assert (lossy.kl_nats <= lossy.kl_high).all() and (lossy.ppl_ratio > 0).all()
    # the benchmark's profile half only: its validate half stays unseen
    base = json.loads((out / "baseline.json").read_text())
    prompts = base["tasks"][0]["prompts"]
    from profiles.evaluation.textmetrics import split_of

    assert prompts and all(split_of(p.split("Question: ")[1].split("\n")[0]) == "profile"
                           for p in prompts)


@pytest.mark.parametrize("budget", ["kl=0.01", "ppl=1.01", "content=0.5", "sums=0.5"])
def test_plan_and_validate_on_each_metric(profiled, budget):
    root, _, out, _, _ = profiled
    metric = budget.split("=")[0]
    plan = root / f"plan-{metric}.json"
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", budget, "--gpu-mem",
                            "25%", "--trials", "10", "--warm-trials", "2", "--rerank", "1",
                            "--no-plots", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    doc = json.loads(plan.read_text())
    assert doc["budget"]["metric"] == metric
    assert doc["budget"]["value"] == pytest.approx(0.01 if metric == "ppl" else
                                                   float(budget.split("=")[1]))
    assert doc["evaluation"]["tasks"] == ["sums"]
    if metric == "kl":   # the accuracy drop the KL implies, from the profile's calibration
        via = doc["predicted"]["content_drop_via_kl"]
        assert via["low"] <= via["value"] <= via["high"] and doc["kl_calibration"]["points"] > 2
    r = runner.invoke(app, ["validate", str(plan), "--limit", "8", "--cache-dir",
                            str(root / "cache"), "--json"])
    assert r.exit_code == 0, r.output
    val = json.loads(r.output)
    assert val["metric"] == metric and val["verdict"] in ("held", "violated", "inconclusive")
    text = val["measured"]["text"]
    assert "validate half" in text["corpus"] and text["tokens"] > 0
    drop = val["measured"]["accuracy_drop"]
    assert drop["low"] <= drop["value"] <= drop["high"]
    if metric == "kl":
        assert drop["value"] == text["kl_nats"]["value"] > 0
    if metric == "ppl":
        assert drop["value"] == pytest.approx(text["ppl_ratio"]["value"] - 1)
    if metric in ("content", "sums"):
        assert list(val["measured"]["tasks"]) == ["sums"]


def test_a_budget_on_a_missing_metric_lists_what_the_profile_has(profiled, tmp_path):
    _, _, out, _, _ = profiled
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", "gsm8k=0.02",
                            "--gpu-mem", "25%", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "error: budget metric 'gsm8k' is not in the profile " + str(out) + "; it has content, "
        "strict, kl, ppl, sums; add a benchmark with --bench FILE or --lm-eval TASK when "
        "profiling"]
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", "kl", "--gpu-mem", "25%",
                            "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "expected METRIC=VALUE" in r.output


def test_text_only_profile_has_no_accuracy_metric(profiled, tmp_path):
    root, ckpt, _, text, _ = profiled
    out = tmp_path / "prof"
    r = runner.invoke(app, ["profile", "model", str(ckpt), "--out", str(out), "--codecs", "szp",
                            "--levels", "1", "--groups", "none", "--text", str(text),
                            "--text-tokens", "800"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "profile.json").read_text())["metrics"]["available"] == ["kl", "ppl"]
    r = runner.invoke(app, ["plan", "--profile", str(out), "--accuracy-budget", "0.01",
                            "--gpu-mem", "25%", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1 and "budget metric 'content' is not in the profile" in r.output
    assert "it has kl, ppl" in r.output


@pytest.mark.parametrize("case", ["empty", "malformed", "pattern", "text-empty", "text-missing",
                                  "lm-eval"])
def test_bad_inputs_are_one_line(profiled, tmp_path, case):
    _, ckpt, _, text, bench = profiled
    args = ["profile", "model", str(ckpt), "--out", str(tmp_path / "p")]
    if case == "empty":
        (tmp_path / "e.jsonl").write_text("")
        args += ["--bench", str(tmp_path / "e.jsonl")]
        want = "no items; expected JSON lines"
    elif case == "malformed":
        (tmp_path / "m.jsonl").write_text('{"question": "a", "answer": "1"}\n{"question": \n')
        args += ["--bench", str(tmp_path / "m.jsonl")]
        want = "line 2: not valid JSON"
    elif case == "pattern":
        args += ["--bench", str(bench), "--extract", r"ANSWER: (\d+)"]
        want = "finds the reference in none of its 40 answers"
    elif case == "text-empty":
        (tmp_path / "e.txt").write_text("\n\n")
        args += ["--text", str(tmp_path / "e.txt")]
        want = "the file is empty"
    elif case == "text-missing":
        args += ["--text", str(tmp_path / "nope.txt")]
        want = "no such file"
    else:
        args += ["--lm-eval", "hellaswag"]
        want = "--lm-eval hellaswag"
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.output
    assert not (tmp_path / "p").exists()   # refused before anything was written


def test_verify_measures_candidates_and_a_rerun_reuses_them(profiled):
    root, _, out, _, _ = profiled
    plan = root / "plan-verified.json"
    args = ["plan", "--profile", str(out), "--budget", "kl=0.01", "--gpu-mem", "25%",
            "--trials", "10", "--warm-trials", "2", "--rerank", "2", "--verify", "2",
            "--no-plots", "--out", str(plan)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "verified candidates" in r.output
    doc = json.loads(plan.read_text())
    ver = doc["verification"]
    assert ver["verified"] == 2 and len(ver["candidates"]) == 2
    ok = [c for c in ver["candidates"] if c["meets_budget_measured"]]
    assert ver["chosen_accuracy"] == ("measured" if ok else "exact (raw)")
    if ok:
        assert doc["predicted"]["accuracy_drop"]["kind"].startswith("measured (verified")
        assert doc["predicted"]["accuracy_drop"] == ok[0]["measured_drop"]
        assert ok[0]["measured_drop"]["ucb"] <= doc["budget"]["value"]
    for c in ver["candidates"]:
        assert c["measured_drop"]["value"] > 0   # lossy policies move the distribution
    import pandas as pd

    rows = pd.read_parquet(out / "verified.parquet")
    assert {c["policy_digest"] for c in ver["candidates"]} <= set(rows["policy_digest"])
    assert len({c["policy_digest"] for c in ver["candidates"]}) == 2
    stamp = (out / "verified.parquet").stat().st_mtime_ns
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (out / "verified.parquet").stat().st_mtime_ns == stamp   # nothing measured again
    assert json.loads(plan.read_text())["verification"]["candidates"] == ver["candidates"]


def test_verification_decides_on_the_measured_bound(profiled):
    from planner.pipeline import PlanRequest, make_plan
    from planner.plan_document import from_baseline
    from planner.verify import verify_options
    from profiles.serving import ServingConfig, parse_mem

    _, _, out, _, _ = profiled
    serving = ServingConfig().with_budgets(parse_mem("25%", what="gpu"), None)
    outcome = make_plan(PlanRequest(profile=str(out), hardware="preset:h200-published",
                                    budget=0.01, serving=serving, metric="kl", trials=5,
                                    warm_trials=0, rerank=0))
    opts = [from_baseline(b, outcome.profile, outcome.closed_form, serving)
            for b in outcome.baselines if b.name in ("rtn4", "rtn8")]
    chosen, rec = verify_options(outcome.profile, outcome.accuracy, 1.0, opts, 2)
    assert chosen.source == opts[0].source and rec["chosen_accuracy"] == "measured"
    assert chosen.drop.kind.startswith("measured") and chosen.drop.ucb <= 1.0
    # a budget no measurement meets: nothing is chosen, and the record says which came closest
    tight = min(c["measured_drop"]["ucb"] for c in rec["candidates"]) / 2
    chosen, rec = verify_options(outcome.profile, outcome.accuracy, tight, opts, 2)
    assert chosen is None and rec["chosen_accuracy"] == "exact (raw)"
    assert "the lowest is" in rec["warning"] and "stores every expert raw" in rec["warning"]


def test_no_verified_candidate_falls_back_to_a_measured_uniform_level(profiled, monkeypatch):
    """When every verified candidate misses, the plan takes the fastest policy the profile
    measured as a whole within the budget, not straight away every expert raw."""
    import planner.verify as verify
    from planner.pipeline import PlanRequest, make_plan
    from profiles.serving import ServingConfig, parse_mem

    _, _, out, _, _ = profiled
    real = verify.verify_options

    def nothing_meets(prof, accuracy, budget, options, n, progress=None, more=()):
        return real(prof, accuracy, 1e-12, options, n, progress, more)

    monkeypatch.setattr(verify, "verify_options", nothing_meets)
    serving = ServingConfig().with_budgets(parse_mem("25%", what="gpu"), None)
    outcome = make_plan(PlanRequest(profile=str(out), hardware="preset:h200-published",
                                    budget=0.01, serving=serving, metric="kl", trials=5,
                                    warm_trials=0, rerank=1, verify=2))
    ver = outcome.plan.doc["verification"]
    measured = [b for b in outcome.baselines if b.feasible and b.drop is not None
                and b.drop.kind.startswith("measured") and b.drop.ucb <= 0.01]
    assert measured, "the fixture's profile should measure a uniform level within kl 0.01"
    assert ver["chosen_accuracy"] == "measured (the profile's whole-model row)"
    assert "falls back to" in ver["warning"]
    chosen = outcome.plan.doc["predicted"]["accuracy_drop"]
    assert chosen["kind"].startswith("measured") and chosen["ucb"] <= 0.01
    assert ver["chosen_source"].split(": ", 1)[1] in {b.name for b in measured}


def test_fall_back_without_a_measured_policy_is_raw():
    from planner.verify import fall_back

    rec = {"candidates": [{"measured_drop": {"ucb": 0.5}, "source": "search"}], "verified": 1,
           "chosen_accuracy": "exact (raw)", "warning": "w"}
    raw = object()
    chosen, out = fall_back(rec, [], raw, lambda o: 0.0)
    assert chosen is raw and out == rec


def test_two_budgets_are_both_met_and_the_binding_one_named(profiled):
    import pandas as pd

    root, _, out, _, _ = profiled
    sens = pd.read_parquet(out / "sensitivity.parquet")
    whole = sens[sens.target == "all"].groupby("codec").first()
    # between rtn8's KL and rtn4's: the faster rtn4 is out, rtn8 is in
    assert whole.loc["rtn8", "kl_high"] < whole.loc["rtn4", "kl_low"]
    kl = (whole.loc["rtn8", "kl_high"] + whole.loc["rtn4", "kl_low"]) / 2
    plan = root / "plan-two.json"
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", "sums=0.5", "--budget",
                            f"kl={kl:.6g}", "--gpu-mem", "25%", "--trials", "10", "--warm-trials",
                            "2", "--rerank", "1", "--verify", "0", "--no-plots", "--out",
                            str(plan)])
    assert r.exit_code == 0, r.output
    doc = json.loads(plan.read_text())
    assert [b["metric"] for b in doc["budgets"]] == ["sums", "kl"]
    assert all(b["meets"] for b in doc["budgets"])
    assert doc["binding_budget"] == max(doc["budgets"], key=lambda b: b["used"])["metric"]
    assert {x["spec"] for x in doc["layers"]} != {"rtn4"}
    assert "budgets the plan meets" in r.output and ", binding" in r.output
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", "kl=0.1", "--budget",
                            "kl=0.2", "--gpu-mem", "25%", "--out", str(root / "p.json")])
    assert r.exit_code == 1 and "two budgets on the same metric" in r.output


def test_validate_on_another_text_or_benchmark(profiled, tmp_path):
    root, _, out, text, bench = profiled
    plan = root / "plan-sums-other.json"
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", "sums=0.5", "--gpu-mem",
                            "25%", "--trials", "10", "--warm-trials", "2", "--verify", "0",
                            "--no-plots", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[:3000])
    r = runner.invoke(app, ["validate", str(plan), "--limit", "4", "--cache-dir",
                            str(root / "cache"), "--text", str(other), "--json"])
    assert r.exit_code == 0, r.output
    val = json.loads(r.output)
    assert val["measured"]["text"]["corpus"].startswith(str(other) + ", validate half")
    copy = tmp_path / "more.jsonl"
    copy.write_text(bench.read_text())
    r = runner.invoke(app, ["validate", str(plan), "--limit", "4", "--cache-dir",
                            str(root / "cache"), "--bench", str(copy)])
    assert r.exit_code == 1
    assert ("its budget is on 'sums', which the given --bench files and --lm-eval tasks do not "
            "include") in r.output
