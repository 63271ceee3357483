"""`moesz simulate` end to end on a model profile directory, and the ratio sources."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from planner.cli import app
from profiles.fileio import atomic_write_json
from profiles.policy import Policy, StorageSpec
from sim.ratios import RatioTable, SyntheticRatios
from sim.synthetic import SyntheticSpec, synthetic_traces
from tests.sim.conftest import MB, make_geometry


@pytest.fixture
def profile_dir(tmp_path):
    """A model profile directory: profile.json with the geometry, ratios and traces."""
    g = make_geometry(num_layers=4, experts=8, top_k=2, bytes_per_expert=20 * MB, name="tiny")
    d = tmp_path / "profile"
    atomic_write_json(d / "profile.json", {
        "kind": "model_profile", "schema_version": 1,
        "model": {"spec": "tiny", "fingerprint": None, "geometry": g.to_dict()}})
    # the layout of docs/model-profile.md: unbounded codecs have mode "none" and level NaN
    rows = [(layer, "szp", "meanabs", lv, '{"variant": "fixed"}', r, "measured")
            for layer in range(4) for lv, r in ((0.5, 4.0), (1.0, 5.0))]
    rows += [(layer, "szp", "meanabs", 1.0, '{"variant": "plain"}', 3.0, "measured")
             for layer in range(4)]
    rows += [(layer, "lossless", "none", float("nan"), '{"zstd_level": 3}', 1.4, "measured")
             for layer in range(4)]
    pd.DataFrame(rows, columns=["layer", "codec", "mode", "level", "codec_options", "ratio",
                                "source"]).to_parquet(d / "ratios.parquet")
    synthetic_traces(g.moe_layers, 8, 2, prompts=3, prompt_tokens=6, decode_tokens=20,
                     spec=SyntheticSpec(1.0, 0.1, 1)).to_parquet(d / "traces.parquet")
    return d


def _run(*args):
    return CliRunner().invoke(app, ["simulate", "--hardware", "preset:h200-published", *args])


def test_simulate_json_on_profile_dir(profile_dir, tmp_path):
    res = _run("--model", str(profile_dir), "--gpu-mem", "20%,60%", "--tokens", "70",
               "--prompt", "6", "--json", "--plot", str(tmp_path / "sweep.png"),
               "--trace-out", str(tmp_path / "trace.json"))
    assert res.exit_code == 0, res.output
    runs = json.loads(res.output)
    assert len(runs) == 2
    for r in runs:
        for key in ("tokens_per_s", "time_s", "tokens", "bytes_h2d", "link_h2d_gbps",
                    "link_busy_fraction", "hit_rate", "gpu_mem_bytes", "closed_form_tokens_per_s"):
            assert key in r
        assert r["tokens"] == 70 and r["link_h2d_gbps"] == 50.0
        assert any("replay cycles" in n for n in r["notes"])  # 3 x 20 recorded tokens, 70 asked
    assert runs[1]["tokens_per_s"] > runs[0]["tokens_per_s"]
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert (tmp_path / "sweep.png").exists()


def test_simulate_uniform_uses_profiled_ratios(profile_dir):
    base = json.loads(_run("--model", str(profile_dir), "--gpu-mem", "20%", "--tokens", "20",
                           "--prompt", "6", "--json").output)[0]
    res = _run("--model", str(profile_dir), "--gpu-mem", "20%", "--tokens", "20", "--prompt", "6",
               "--uniform", "szp:meanabs:1.0", "--json")
    assert res.exit_code == 0, res.output
    comp = json.loads(res.output)[0]
    assert comp["bytes_h2d"] == pytest.approx(base["bytes_h2d"] / 5.0, rel=0.01)
    assert any("ratios from" in lab for lab in comp["labels"])


def test_simulate_table_and_errors(profile_dir):
    res = _run("--model", str(profile_dir), "--gpu-mem", "50%", "--tokens", "10", "--prompt", "4",
               "--cache", "lru,static-hot")
    assert res.exit_code == 0, res.output
    assert "tok/s sim" in res.output and "static-hot" in res.output and "predicted" in res.output
    bad = _run("--model", str(profile_dir), "--gpu-mem", "-5GiB", "--tokens", "10")
    assert bad.exit_code == 1 and "error: --gpu-mem" in bad.output and "negative" in bad.output
    bad = _run("--model", str(profile_dir), "--gpu-mem", "50%", "--synthetic", "zipf:1",
               "--traces", "x.parquet")
    assert bad.exit_code == 1 and "not both" in bad.output


def test_ratio_sources(profile_dir):
    g = make_geometry(num_layers=4, experts=8)
    table = RatioTable.from_parquet(profile_dir / "ratios.parquet")
    assert table.ratio(2, StorageSpec("szp", "meanabs", 1.0), g) == 5.0
    assert table.ratio(2, StorageSpec("szp", "meanabs", 1.0, {"variant": "plain"}), g) == 3.0
    assert table.ratio(2, StorageSpec("lossless"), g) == 1.4
    mid = table.ratio(2, StorageSpec("szp", "meanabs", 0.7071067811865476), g)
    assert mid == pytest.approx(4.5) and "interpolated" in table.label
    with pytest.raises(Exception, match="no ratio for codec 'rtn8'"):
        table.ratio(0, StorageSpec("rtn8"), g)
    syn = SyntheticRatios(seed=0)
    r = syn.ratio(0, StorageSpec("szp", "meanabs", 1.0), g)
    assert r > 2.0 and "synthetic Gaussian" in syn.label
    assert syn.ratio(0, StorageSpec("raw"), g) == 1.0
    assert Policy.none().spec_for(0, 0).codec == "raw"


def test_placement_traces_option(profile_dir, tmp_path):
    """--placement-traces ranks static-hot by other traces: the same traces give the oracle's
    figures; traces of a different routing give fewer hits, and the run says what ranked it."""
    g_layers = (0, 1, 2, 3)
    same = profile_dir / "traces.parquet"
    other = tmp_path / "other.parquet"
    synthetic_traces(g_layers, 8, 2, prompts=3, prompt_tokens=6, decode_tokens=20,
                     spec=SyntheticSpec(1.0, 0.0, 7)).assign(
        expert=lambda d: 7 - d["expert"]).to_parquet(other)  # the hot experts become cold
    args = ("--model", str(profile_dir), "--gpu-mem", "40%", "--cache", "static-hot", "--tokens",
            "60", "--prompt", "6", "--json")  # 60 = every recorded decode token, once
    oracle, as_same, shifted = (json.loads(_run(*args, *extra).output)[0] for extra in
                                ((), ("--placement-traces", str(same)),
                                 ("--placement-traces", str(other))))
    assert as_same["hit_rate"] == oracle["hit_rate"]
    assert shifted["hit_rate"] < oracle["hit_rate"]
    assert any(str(other) in n for n in shifted["notes"])
    bad = _run(*args, "--placement-traces", str(tmp_path / "missing.parquet"))
    assert bad.exit_code == 1 and "Traceback" not in bad.output


def test_bad_output_paths_fail_before_simulating(profile_dir, tmp_path):
    args = ("--model", str(profile_dir), "--gpu-mem", "20%", "--tokens", "8", "--prompt", "2")
    for extra, message in ((("--gantt", str(tmp_path / "gantt.xyz")), "expected a file name ending"),
                           (("--gantt", str(tmp_path / "noext")), "expected a file name ending"),
                           (("--trace-out", str(tmp_path)), "is a directory"),
                           (("--plot", str(tmp_path)), "is a directory")):
        r = _run(*args, *extra)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
