"""An lm-evaluation-harness task as the user's metric through profile -> plan -> validate (and
`model eval`): a random-initialised Mixtral-style checkpoint with a locally built Hugging Face
tokenizer and a local multiple-choice task YAML, the budget naming the task; and the one-line
refusals."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from planner.cli import app
from tests.profiles.eval_helpers import one_torch_thread, save_text_checkpoint  # noqa: F401
from tests.profiles.lmeval_helpers import TASK, write_task

runner = CliRunner()
NEEDS = "lm-eval[hf]==0.4.13 is optional (pip install moesz[lmeval])"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_text_checkpoint("mixtral", tmp_path_factory.mktemp("lmck") / "ckpt")


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, ckpt):
    pytest.importorskip("lm_eval.models.huggingface", reason=NEEDS)
    root = tmp_path_factory.mktemp("lmeval")
    yaml = write_task(root / "task")
    out = root / "prof"
    r = runner.invoke(app, ["profile", "model", str(ckpt), "--out", str(out), "--codecs", "szp",
                            "--levels", "1", "--layers", "1", "--groups", "none", "--limit", "12",
                            "--lm-eval", str(yaml)])
    assert r.exit_code == 0, r.output
    return root, yaml, out


def test_profile_records_the_task_its_metric_and_half(profiled):
    _, yaml, out = profiled
    doc = json.loads((out / "profile.json").read_text())
    m = doc["metrics"]
    assert m["available"] == ["content", "strict", "kl", "ppl", TASK] and doc["tasks"] == [TASK]
    (rec,) = m["lm_eval"]
    assert rec["source"] == str(yaml.resolve()) and rec["metric"] == "acc"
    assert rec["output_type"] == "multiple_choice" and rec["docs"] == 40
    assert "document's JSON" in rec["split_method"]
    import pandas as pd

    sens = pd.read_parquet(out / "sensitivity.parquet")
    assert set(sens.task) == {TASK} and (sens.n == 12).all()
    assert (sens.content_change_low <= sens.content_change).all()


@pytest.fixture(scope="module")
def planned(profiled):
    root, _, out = profiled
    plan = root / "plan.json"
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", f"{TASK}=0.5",
                            "--gpu-mem", "25%", "--trials", "6", "--warm-trials", "2",
                            "--rerank", "1", "--verify", "1", "--no-plots", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    return plan


def test_plan_on_the_task_and_validate_on_its_other_half(profiled, planned):
    root, _, out = profiled
    plan = planned
    doc = json.loads(plan.read_text())
    assert doc["budget"]["metric"] == TASK and doc["evaluation"]["tasks"] == [TASK]
    assert doc["verification"]["verified"] == 1   # measured again through lm-eval
    r = runner.invoke(app, ["validate", str(plan), "--cache-dir", str(root / "cache"), "--json"])
    assert r.exit_code == 0, r.output
    val = json.loads(r.output)
    assert val["metric"] == TASK and list(val["measured"]["tasks"]) == [TASK]
    assert val["verdict"] in ("held", "violated", "inconclusive")
    drop = val["measured"]["accuracy_drop"]
    assert drop["low"] <= drop["value"] <= drop["high"]
    # the validate half only: none of the profile's documents
    base = json.loads((out / "baseline.json").read_text())["tasks"][0]
    assert val["n_prompts"] == 12 and base["n"] == 12
    r = runner.invoke(app, ["validate", str(plan), "--cache-dir", str(root / "cache"),
                            "--limit", "40", "--json"])
    seen = json.loads(r.output)["measured"]["tasks"][TASK]["n"]
    assert 12 < seen < 40   # the whole validate half, which is not all 40 documents


def test_model_eval_pairs_the_task_per_document(profiled, ckpt):
    _, yaml, _ = profiled
    r = runner.invoke(app, ["model", "eval", str(ckpt), "--lm-eval", str(yaml), "--uniform",
                            "rtn4", "--limit", "8", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    row = doc["tasks"][TASK]
    assert row["n"] == 8 and row["verdict"] in ("improved", "degraded", "no significant change")
    assert doc["lm_eval"][0]["metric"] == "acc" and doc["lm_eval"][0]["split"] == "validate"


def test_a_budget_on_a_task_the_profile_lacks_lists_what_it_has(profiled, tmp_path):
    _, _, out = profiled
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", "hellaswag=0.02",
                            "--gpu-mem", "25%", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"error: budget metric 'hellaswag' is not in the profile {out}; it has content, strict, "
        f"kl, ppl, {TASK}; add a benchmark with --bench FILE or --lm-eval TASK when profiling"]


@pytest.mark.parametrize("case", ["not-installed", "unknown", "not-local", "malformed",
                                  "builtin"])
def test_bad_lm_eval_inputs_are_one_line(ckpt, tmp_path, monkeypatch, case):
    if case != "not-installed":
        pytest.importorskip("lm_eval.models.huggingface", reason=NEEDS)
    yaml = write_task(tmp_path / "task")
    model, spec = str(ckpt), str(yaml)
    if case == "not-installed":
        monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)
        want = f"--lm-eval {spec}: lm-evaluation-harness is not installed here"
    elif case == "unknown":
        spec, want = "helaswag", "lm-eval has no task, group or tag of that name (close: hellaswag"
    elif case == "not-local":   # registered, but its dataset is on the Hub, not in the cache
        spec, want = "hellaswag", "--lm-eval hellaswag: its data are not local"
    elif case == "malformed":
        (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
        spec, want = str(tmp_path / "bad.yaml"), "not a readable lm-eval task YAML"
    else:
        model, want = "builtin", "the built-in model's character tokenizer cannot run its tasks"
    out = tmp_path / "p"
    r = runner.invoke(app, ["profile", "model", model, "--out", str(out), "--lm-eval", spec])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.output
    assert not out.exists()   # refused before anything was written


def test_validate_on_other_tasks_and_a_rerun_with_others_is_refused(profiled, planned, ckpt,
                                                                    tmp_path):
    root, yaml, out = profiled
    other = tmp_path / "other.yaml"
    other.write_text(yaml.read_text().replace(f"task: {TASK}", "task: other_sums")
                     .replace("sums.jsonl", str(yaml.parent / "sums.jsonl")))
    plan = planned
    r = runner.invoke(app, ["validate", str(plan), "--cache-dir", str(root / "cache"),
                            "--lm-eval", str(other)])
    assert r.exit_code == 1
    assert (f"its budget is on '{TASK}', which the given --bench files and --lm-eval tasks do "
            f"not include (other_sums)") in r.output
    r = runner.invoke(app, ["profile", "model", str(ckpt), "--out", str(out), "--codecs", "szp",
                            "--levels", "1", "--layers", "1", "--groups", "none", "--limit", "12",
                            "--lm-eval", str(other)])
    assert r.exit_code == 1
    assert f"was profiled with tasks=['{TASK}'], this run asks for ['other_sums']" in r.output


def test_validate_on_another_version_of_the_plans_task_is_refused(profiled, planned, tmp_path):
    """The plan's task name with other prompts: validating on it would not test the plan."""
    root, yaml, _ = profiled
    other = tmp_path / f"{TASK}.yaml"
    other.write_text(yaml.read_text().replace("Answer:", "The answer is")
                     .replace("sums.jsonl", str(yaml.parent / "sums.jsonl")))
    r = runner.invoke(app, ["validate", str(planned), "--cache-dir", str(root / "cache"),
                            "--lm-eval", str(other)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and f"task '{TASK}' differs from the one the plan was made on " \
        "(prompts_sha256)" in lines[0], r.output


def test_verifying_without_lm_eval_says_how_to_plan_anyway(profiled, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "prof"
    shutil.copytree(profiled[2], out)
    (out / "verified.parquet").unlink(missing_ok=True)   # nothing measured yet: lm-eval is needed
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)
    r = runner.invoke(app, ["plan", "--profile", str(out), "--budget", f"{TASK}=0.5",
                            "--gpu-mem", "25%", "--trials", "4", "--verify", "1", "--no-plots",
                            "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert "lm-evaluation-harness is not installed here" in line
    assert line.endswith("or give --verify 0 to plan on the prediction alone")
