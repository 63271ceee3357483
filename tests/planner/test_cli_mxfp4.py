"""An MXFP4 gpt_oss checkpoint (gpt-oss's on-disk layout) end to end through the CLI:
`model info`, `profile model`, `plan`, `pack` and `run`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app
from tests.fixtures_models import save_tiny_mxfp4_gpt_oss

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_mxfp4_gpt_oss(tmp_path_factory.mktemp("oss") / "ckpt")


@pytest.fixture(scope="module")
def profile(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p"
    r = runner.invoke(app, ["profile", "model", str(ckpt), "--out", str(out), "--codecs",
                            "szp,q4_k,nf4", "--levels", "1", "--limit", "2", "--groups", "none",
                            "--json"])
    assert r.exit_code == 0, r.output
    return out


def test_model_info_reports_each_expert_tensor_as_stored(ckpt):
    r = runner.invoke(app, ["model", "info", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["dtype"] == "mxfp4" and doc["fingerprint"].startswith("fp2:")
    stored = {t["name"]: t for t in doc["expert_tensors_stored"]}
    assert stored["gate_up_proj"]["format"] == "mxfp4"
    assert stored["gate_up_proj_bias"]["format"] == "bf16"
    assert stored["gate_up_proj"]["stored_bytes"] * 32 == stored["gate_up_proj"]["bf16_bytes"] * 17 // 2
    assert sum(t["stored_bytes"] for t in stored.values()) == doc["bytes_per_expert"]
    r = runner.invoke(app, ["model", "info", str(ckpt)])
    assert r.exit_code == 0 and "expert tensors as stored" in r.output and "in bf16" in r.output


def test_profile_ratios_are_against_the_shipped_bytes_with_bf16_beside(profile):
    import pandas as pd

    r = pd.read_parquet(profile / "ratios.parquet")
    row = r[(r.codec == "q4_k") & (r.layer == 0)].iloc[0]
    # Q4_K (4.5 bits) is larger than the shipped MXFP4 (4.25 bits), 3.5x smaller than bf16
    assert row.ratio < 1.0 < row.ratio_vs_bf16
    assert row.ratio_vs_bf16 / row.ratio == pytest.approx(
        2 * (2 * 64 * 64 + 64 * 64 + 3 * 64) / row.original_bytes_per_expert)


def test_plan_compares_with_the_shipped_format_and_the_best_user_format(profile, tmp_path):
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["plan", "--profile", str(profile), "--accuracy-budget", "0.5",
                            "--gpu-mem", "25%", "--trials", "10", "--warm-trials", "2",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    base = {b["name"]: b for b in doc["baselines"]}
    assert "as the checkpoint ships them (mxfp4" in base["no compression"]["note"]
    assert "best user format" in base
    assert any(n.startswith("mxfp4 GPU decode: estimated") for n in doc["notes"])
    r = runner.invoke(app, ["plan", "show", str(out)])
    assert r.exit_code == 0 and "best user format" in r.output and "per-row absmax" in r.output


def test_pack_and_run_a_mixed_plan(ckpt, tmp_path):
    policy = tmp_path / "mixed.json"
    policy.write_text(json.dumps({
        "kind": "policy", "schema_version": 1, "fingerprint": None,
        "default": {"codec": "raw"},
        "layers": {"0": {"codec": "q4_k"},
                   "1": {"codec": "szp", "mode": "meanabs", "level": 1.0}}}))
    out = tmp_path / "packed"
    r = runner.invoke(app, ["pack", str(ckpt), "--policy", str(policy), "--out", str(out),
                            "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["checkpoint_expert_bytes"] == 12 * (3 * 64 * 64 * 17 // 32 + 2 * 3 * 64)
    assert doc["ratio_vs_checkpoint"] == pytest.approx(doc["checkpoint_expert_bytes"]
                                                       / doc["stored_expert_bytes"])
    r = runner.invoke(app, ["run", str(out), "--gpu-mem", "50%", "--tokens", "4", "--prompt",
                            "4", "--json"])
    assert r.exit_code == 0, r.output
    run = json.loads(r.output)
    assert run["tokens_per_s"] > 0 and run["misses"] > 0


def test_raw_is_the_shipped_format_dequantized_on_the_gpu(profile, tmp_path):
    """For an MXFP4 checkpoint `raw` moves the shipped bytes and pays the GPU dequantization, in
    the simulator's costs and in the planner's choice table alike."""
    from planner.pipeline import PlanRequest, make_plan
    from profiles.hardware import load_hardware
    from profiles.policy import Policy
    from profiles.serving import ServingConfig
    from sim.costs import GPU, build_costs

    serving = ServingConfig(gpu_mem_fraction=0.25, prompt_tokens=4, generated_tokens=16)
    o = make_plan(PlanRequest(profile=str(profile), hardware="preset:h200-published",
                              budget=0.5, serving=serving, trials=5, warm_trials=1, rerank=0))
    g = o.profile.geometry
    costs = build_costs(g, Policy.none(), load_hardware("preset:h200-published"), serving,
                        o.profile.ratios)
    assert (costs.decode_where == GPU).all() and (costs.link_bytes == g.bytes_per_expert).all()
    assert (o.table.decode_gbps[:, 0] > 0).all()
    assert (o.table.stored_bytes[:, 0] == g.bytes_per_expert).all()
