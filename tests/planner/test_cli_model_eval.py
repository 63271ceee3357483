"""`moesz model eval` and `moesz model trace` through typer's test runner, on a tiny checkpoint."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from planner.cli import app
from profiles.traces import TRACE_COLUMNS
from tests.profiles.eval_helpers import one_torch_thread, save_tiny_checkpoint  # noqa: F401

runner = CliRunner()
INTERVAL = {"value", "low", "high", "method"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt") / "m"))


def test_eval_json_has_intervals_per_task(ckpt):
    r = runner.invoke(app, ["model", "eval", ckpt, "--tasks", "add,sort", "--limit", "3",
                            "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert list(doc["tasks"]) == ["add", "sort"] and doc["source"] == "measured"
    for row in doc["tasks"].values():
        assert row["n"] == 3 and set(row["strict"]) == INTERVAL == set(row["content"])
        assert row["content"]["method"].startswith("wilson")
        assert "content_change" not in row
    assert doc["policy"] is None


def test_eval_with_a_uniform_policy_is_paired(ckpt):
    r = runner.invoke(app, ["model", "eval", ckpt, "--tasks", "add", "--limit", "4",
                            "--uniform", "szp:meanabs:2", "--fidelity", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    row = doc["tasks"]["add"]
    assert set(row["content_change"]) == INTERVAL and "newcombe" in row["content_change"]["method"]
    assert 0.0 < row["mcnemar_p"] <= 1.0 and row["verdict"] in (
        "improved", "degraded", "no significant change")
    assert doc["policy"].startswith("uniform szp:meanabs:2") and doc["policy_bytes"]["ratio"] > 1
    assert doc["fidelity"]["mean_kl_nats"] > 0 and 0 <= doc["fidelity"]["top1_agreement"] <= 1


def test_eval_table_says_what_was_measured(ckpt, tmp_path):
    policy = tmp_path / "p.json"
    from profiles.policy import Policy

    Policy.uniform("rtn8").save(policy)
    r = runner.invoke(app, ["model", "eval", ckpt, "--tasks", "sub", "--limit", "2",
                            "--policy", str(policy)])
    assert r.exit_code == 0, r.output
    assert "measured" in r.output and "Wilson" in r.output and "Newcombe" in r.output
    assert "McNemar" in r.output and "sub" in r.output


def test_eval_of_a_user_benchmark(ckpt, tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text('{"question": "1+1", "answer": "#### 2"}\n{"question": "2+5", "answer": 7}\n')
    r = runner.invoke(app, ["model", "eval", ckpt, "--bench", str(path), "--template",
                            "{question}=", "--max-new-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tasks"]["mini"]["n"] == 2


@pytest.mark.parametrize("args, message", [
    (["--uniform", "szp:meanabs:1", "--policy", "p.json"], "either --policy FILE or --uniform"),
    (["--split", "train"], "--split 'train' is invalid"),
    (["--fidelity"], "--fidelity compares against the base model"),
    (["--uniform", "szp:meanabs"], "is not CODEC or CODEC:MODE:LEVEL"),
    (["--tasks", "mul"], "unknown task 'mul'"),
    (["--alpha", "2"], "--alpha 2 must be between 0 and 1"),
    (["--threads", "0"], "--threads 0 is invalid"),
])
def test_eval_errors_are_one_line(ckpt, args, message):
    r = runner.invoke(app, ["model", "eval", ckpt, "--limit", "2", *args])
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output


def test_eval_of_a_missing_model_is_an_error(tmp_path):
    r = runner.invoke(app, ["model", "eval", str(tmp_path / "nope"), "--limit", "2"])
    assert r.exit_code == 1 and r.output.startswith("error:")


def test_trace_writes_the_parquet_contract(ckpt, tmp_path):
    out = tmp_path / "t.parquet"
    r = runner.invoke(app, ["model", "trace", ckpt, "--out", str(out), "--tasks", "add",
                            "--limit", "3", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    df = pd.read_parquet(out)
    assert tuple(df.columns) == TRACE_COLUMNS and len(df) == doc["rows"]
    assert set(df["phase"]) == {"prefill", "decode"} and doc["prompts"] == 3
    assert doc["decode"]["layers"][0]["tokens"] > 0
    table = runner.invoke(app, ["model", "trace", ckpt, "--out", str(out), "--limit", "2"])
    assert table.exit_code == 0 and "measured" in table.output and "Gini" in table.output


def test_trace_needs_a_parquet_name(ckpt, tmp_path):
    r = runner.invoke(app, ["model", "trace", ckpt, "--out", str(tmp_path / "t.csv")])
    assert r.exit_code == 1 and "expected a .parquet file" in r.output
