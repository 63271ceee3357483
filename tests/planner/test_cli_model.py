"""`moesz model info` and `moesz model presets` through typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app
from tests.fixtures_models import save_tiny_model

runner = CliRunner()
FIELDS = {"moe_layers", "experts_per_layer", "top_k", "dtype", "bytes_per_expert",
          "shared_expert_bytes", "non_expert_bytes", "fingerprint"}


def test_info_json_of_a_preset():
    r = runner.invoke(app, ["model", "info", "preset:moonlight-16b-a3b", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert FIELDS <= set(doc)
    assert doc["moe_layers"] == list(range(1, 27)) and doc["experts_per_layer"] == 64
    assert (doc["top_k"], doc["dtype"], doc["bytes_per_expert"]) == (6, "bf16", 17_301_504)
    assert doc["fingerprint"] is None and "published config (preset)" in doc["source"]


def test_info_table_of_an_arch_with_dtype():
    r = runner.invoke(app, ["model", "info", "arch:qwen3_moe,dtype=fp32"])
    assert r.exit_code == 0, r.output
    assert "24 (MoE 0-23)" in r.output and "128 per MoE layer, top-8" in r.output
    assert "fp32" in r.output and "none (no weights)" in r.output


def test_info_of_a_checkpoint_has_a_fingerprint(tmp_path):
    path = save_tiny_model("qwen2_moe", tmp_path / "q")
    r = runner.invoke(app, ["model", "info", str(path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["fingerprint"].startswith("fp2:") and doc["shared_expert_bytes"] > 0
    r = runner.invoke(app, ["model", "info", str(path), "--json", "--no-fingerprint"])
    assert json.loads(r.output)["fingerprint"] is None


@pytest.mark.parametrize("model, message", [
    ("/no/such/model", "no such directory"),
    ("preset:nope", "preset 'nope' does not exist"),
    ("arch:llama", "no routed-expert layers"),
])
def test_info_errors_are_one_line(model, message):
    r = runner.invoke(app, ["model", "info", model])
    assert r.exit_code == 1
    assert r.output.startswith("error: ") and message in r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1


def test_presets_lists_the_real_models():
    r = runner.invoke(app, ["model", "presets", "--json"])
    assert r.exit_code == 0
    names = {p["name"] for p in json.loads(r.output)}
    assert {"mixtral-8x7b", "deepseek-v3", "gpt-oss-120b", "moonlight-16b-a3b"} <= names
