"""`moesz policy show`: the per-matrix table of a policy file, and bad files as one line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from planner.cli import app

runner = CliRunner()

DOC = {"kind": "policy", "schema_version": 2,
       "default": {"codec": "rtn8", "matrices": {"down": {"codec": "lossless"}}},
       "layers": {"3": {"matrices": {"gate_up": {"codec": "rtn4"}}}},
       "experts": {"2:1": {"codec": "raw"}}}


def test_policy_show_prints_each_matrix_at_each_level(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(DOC))
    res = runner.invoke(app, ["policy", "show", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = [" ".join(line.replace("│", " ").replace("┃", " ").split()) for line in res.output.splitlines()]
    assert "where gate_up down" in lines
    assert "default rtn8 lossless,zstd_level=3" in lines
    assert "layer 3 rtn4 lossless,zstd_level=3" in lines
    assert "expert 2:1 raw raw" in lines


def test_policy_show_refuses_an_unknown_matrix_in_one_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**DOC, "default": {"codec": "raw",
                                                   "matrices": {"ffn2": {"codec": "rtn8"}}}}))
    res = runner.invoke(app, ["policy", "show", str(path)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"error: {path} default: unknown matrix 'ffn2'; valid matrices: gate_up, down, gate, up "
        f"(gate and up only where a model stores them separately)"]
    assert "Traceback" not in res.output
