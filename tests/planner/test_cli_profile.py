"""`moesz profile hardware | model | show` through typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()


def _builtin_ready() -> bool:
    from profiles.builtin import FILES, builtin_dir

    return all((builtin_dir() / f).exists() for f in FILES)


def test_hardware_quick_without_gpu_and_show(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    out = tmp_path / "hw.json"
    r = runner.invoke(app, ["profile", "hardware", "--out", str(out), "--quick", "--disk-dir",
                            str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "CPU as the runtime's device" in r.stdout and "(measured" in r.stdout
    assert "disk reads in flight" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["kind"] == "hardware_profile" and doc["gpu"]["device_type"] == "cpu"
    assert doc["raw"]["command"].startswith("moesz profile hardware")
    r = runner.invoke(app, ["profile", "show", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["host"]["disk_read"]["source"] == "measured"


@pytest.mark.skipif(not _builtin_ready(), reason="the built-in model's weights are not built yet")
def test_model_tiny_grid_then_show(tmp_path):
    out = tmp_path / "prof"
    r = runner.invoke(app, ["profile", "model", "builtin", "--out", str(out), "--codecs", "szp",
                            "--levels", "2", "--layers", "5", "--groups", "none", "--limit", "8",
                            "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["points_total"] == 4
    assert summary["evaluations_per_s"]["source"] == "measured"
    r = runner.invoke(app, ["profile", "show", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1 and doc["model"]["fingerprint"].startswith("fp2:")
    assert {"layer", "codec", "mode", "level", "ratio"} <= set(doc["ratios"][0])
    rec = next(x for x in doc["sensitivity"] if x["codec"] == "szp")
    assert {"target", "codec", "mode", "level", "task", "content_change", "content_change_low",
            "content_change_high", "content_mcnemar_p", "kl_nats"} <= set(rec)
    assert rec["target"] == "layer:5" and rec["level"] == 2.0
    r = runner.invoke(app, ["profile", "show", str(out / "profile.json")])
    assert r.exit_code == 0, r.output
    assert "detection limit" in r.stdout and "compression ratios" in r.stdout
    assert "layer:5" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["profile", "model", "builtin", "--out", "X", "--levels", "abc"], "level 'abc' is not a number"),
    (["profile", "model", "builtin", "--out", "X", "--max-evals", "-1"], "--max-evals -1"),
    (["profile", "show", "NOPE"], "no such model profile directory"),
    (["profile", "model", "builtin", "--out", "X", "--matrices", "gate,ffn"],
     "--matrices: unknown matrix 'ffn'; valid matrices: gate_up, down, gate, up"),
])
def test_errors_are_one_line(tmp_path, args, match):
    args = [a.replace("X", str(tmp_path / "x")).replace("NOPE", str(tmp_path / "nope"))
            for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()     # (a transient progress bar leaves a blank line)
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert "Traceback" not in r.output


def test_show_refuses_other_files(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"kind": "plan", "schema_version": 1}')
    r = runner.invoke(app, ["profile", "show", str(plan)])
    assert r.exit_code == 1 and "field 'kind' is 'plan', expected 'hardware_profile'" in r.output
