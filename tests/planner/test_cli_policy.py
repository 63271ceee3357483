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
        f"(gate and up: the two parts of gate_up)"]
    assert "Traceback" not in res.output


def test_pack_and_run_a_per_matrix_policy_then_show_the_manifests_policy(tmp_path):
    from tests.fixtures_models import save_tiny_model

    model = save_tiny_model("olmoe", tmp_path / "m")
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"kind": "policy", "schema_version": 2, "default": {
        "codec": "szp", "mode": "meanabs", "level": 1, "matrices": {"down": {"codec": "rtn8"}}}}))
    res = runner.invoke(app, ["pack", str(model), "--policy", str(policy), "--out",
                              str(tmp_path / "ck"), "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert {e["spec"] for e in manifest["experts"]} == {
        "gate_up=szp:meanabs:1,variant=fixed;down=rtn8"}
    res = runner.invoke(app, ["run", str(tmp_path / "ck"), "--tokens", "3", "--prompt", "4",
                              "--device", "cpu"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "— gate_up=szp:meanabs:1,variant=fixed;down=rtn8;" in res.output
    res = runner.invoke(app, ["policy", "show", str(tmp_path / "ck" / "manifest.json")],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "per-matrix policy" in res.output


def test_a_matrix_codec_that_cannot_encode_here_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("cuszp may encode on a CUDA machine")
    from tests.fixtures_models import save_tiny_model

    model = save_tiny_model("olmoe", tmp_path / "m")
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"kind": "policy", "schema_version": 2, "default": {
        "codec": "raw", "matrices": {"down": {"codec": "cuszp", "mode": "abs", "level": 0.01}}}}))
    res = runner.invoke(app, ["pack", str(model), "--policy", str(policy), "--out",
                              str(tmp_path / "ck")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: policy codec 'cuszp' cannot encode")
