"""Profiling the built-in model on a tiny grid: files, resume, identical-weight reuse, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiles.errors import ProfileError
from profiles.profiling import ProfileRequest, profile_model, read_profile
from profiles.profiling.format import RATIOS_FILE, SENSITIVITY_COLUMNS, SENSITIVITY_FILE

ROOT = Path(__file__).resolve().parents[2]


def _builtin_ready() -> bool:
    from profiles.builtin import FILES, builtin_dir

    return all((builtin_dir() / f).exists() for f in FILES)


pytestmark = pytest.mark.skipif(not _builtin_ready(), reason="the built-in model's weights are "
                                "not built yet (python -m profiles.builtin.train)")
TINY = dict(model="builtin", codecs="szp,sz3", levels="1", layers="3", groups="none", limit=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny profile made in two runs: the first stops after 2 points, the second resumes."""
    out = tmp_path_factory.mktemp("prof")
    first = profile_model(ProfileRequest(out=out, max_evals=2, command="pytest", **TINY))
    second = profile_model(ProfileRequest(out=out, command="pytest", **TINY))
    return out, first, second


def test_tiny_profile_files_and_fields(tiny):
    out, first, second = tiny
    for name in ("profile.json", RATIOS_FILE, SENSITIVITY_FILE, "traces.parquet", "sweep.db",
                 "baseline.json", "plots/ratios.png", "plots/sensitivity_content.png"):
        assert (out / name).exists(), name
    prof = read_profile(out)
    d = prof.doc
    assert d["kind"] == "model_profile" and d["schema_version"] == 1
    assert d["model"]["fingerprint"] and d["model"]["geometry"]["moe_layers"]
    assert d["split"] == "profile" and d["prompts_per_task"] == 8 and d["complete"]
    assert d["points_total"] == d["points_done"] == 5    # szp, sz3 at one level + 3 baselines
    assert d["command"] == "pytest" and "torch" in d["packages"]
    assert set(d["baseline"]) == {"add", "sub", "sort", "reverse"}
    lim = d["detection_limit"]
    assert lim["metric"] == "content" and 0 < lim["floor_half_width"] <= lim["half_width"] + 1e-12
    # ratios: layer 3 x (szp, sz3 at level 1), and the whole-model baselines lossless, rtn8,
    # rtn4 at every MoE layer (their policies cover every layer); all 8 experts each
    r = prof.ratios
    assert sorted(r[r.layer == 3].codec) == sorted(["szp", "sz3", "lossless", "rtn8", "rtn4"])
    assert set(r[r.codec.isin(["szp", "sz3"])].layer) == {3}
    assert len(r[r.codec.isin(["lossless", "rtn8", "rtn4"])]) == 3 * 8
    assert (r.n_experts == 8).all()
    assert (r.ratio > 1).all() and (r.max_err_over_bound.dropna() <= 1.02).all()
    assert r[r.codec == "lossless"].level.isna().all()
    # sensitivity: one row per point x task, with the documented columns
    s = prof.sensitivity
    assert list(s.columns[:len(SENSITIVITY_COLUMNS)]) == list(SENSITIVITY_COLUMNS)
    assert len(s) == 5 * 4 and (s.n == 8).all()
    assert ((s.content_change_low <= s.content_change) & (s.content_change <= s.content_change_high)).all()
    assert (s.interval_method == "newcombe-paired").all()


def test_resume_ran_every_point_once(tiny):
    _, first, second = tiny
    assert len(first.ran) == 2 and not first.complete
    assert second.complete and not set(first.ran) & set(second.ran)
    assert len(first.ran) + len(second.ran) == 5
    out = tiny[0]
    third = profile_model(ProfileRequest(out=out, **TINY))
    assert third.ran == () and third.complete


def test_identical_weights_are_not_evaluated_twice(tiny):
    s = read_profile(tiny[0]).sensitivity
    szp, sz3 = s[s.codec == "szp"], s[s.codec == "sz3"]
    # sz3 and szp decode to the same weights at a meanabs bound: one of them reuses the other
    assert szp.weights_digest.iat[0] == sz3.weights_digest.iat[0]
    assert (szp.reused_from.notna().all()) != (sz3.reused_from.notna().all())
    assert list(szp.content) == list(sz3.content)
    lossless = s[s.codec == "lossless"]
    assert lossless.weights_unchanged.all() and (lossless.content_change == 0).all()
    assert (lossless.kl_nats == 0).all() and (lossless.top1_agreement == 1).all()
    rtn4 = s[s.codec == "rtn4"]
    assert not rtn4.weights_unchanged.any() and (rtn4.kl_nats > 0).all()


def test_corrupt_or_wrong_version_profile_is_a_clear_error(tiny, tmp_path):
    import shutil

    src = tiny[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    doc = json.loads((bad / "profile.json").read_text())
    (bad / "profile.json").write_text(json.dumps({**doc, "schema_version": 7}))
    with pytest.raises(ProfileError, match=r"profile.json: field 'schema_version' is 7, expected 1"):
        read_profile(bad)
    (bad / "profile.json").write_text("{not json")
    with pytest.raises(ProfileError, match=r"profile.json: not valid JSON"):
        read_profile(bad)
    (bad / "profile.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "baseline"}))
    with pytest.raises(ProfileError, match=r"field 'baseline' is missing"):
        read_profile(bad)
    (bad / "profile.json").write_text(json.dumps(doc))
    (bad / SENSITIVITY_FILE).write_bytes(b"PAR1 garbage")
    with pytest.raises(ProfileError, match=r"sensitivity.parquet: not a readable parquet"):
        read_profile(bad)
    import pandas as pd

    pd.read_parquet(src / SENSITIVITY_FILE).drop(columns=["content_change"]).to_parquet(
        bad / SENSITIVITY_FILE)
    with pytest.raises(ProfileError, match=r"column 'content_change' is missing"):
        read_profile(bad)
    with pytest.raises(ProfileError, match="no such model profile directory"):
        read_profile(tmp_path / "nothing")


def test_another_model_in_the_same_out_is_refused(tiny):
    out = tiny[0]
    doc = json.loads((out / "profile.json").read_text())
    doc["model"]["fingerprint"] = "fp2:someoneelse"
    other = out.parent / "other"
    other.mkdir()
    (other / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="another model"):
        profile_model(ProfileRequest(out=other, **TINY))


def test_other_settings_in_the_same_out_are_refused_before_writing(tiny):
    out = tiny[0]
    stamps = {f: (out / f).stat().st_mtime_ns for f in ("traces.parquet", "baseline.json",
                                                        "profile.json", RATIOS_FILE)}
    with pytest.raises(ProfileError, match="prompts_per_task=8, this run asks for 9"):
        profile_model(ProfileRequest(out=out, **{**TINY, "limit": 9}))
    assert stamps == {f: (out / f).stat().st_mtime_ns for f in stamps}


@pytest.mark.parametrize("field,value,match", [
    ("levels", "0,1", "positive"), ("layers", "3,99", "not an MoE layer"),
    ("target", "top:0", "N must be"), ("codecs", "zip", "unknown"), ("design", "study", "grid or paper"),
    ("groups", "G1", "NAME=LAYERS"), ("limit", 0, "at least 1"),
    ("baselines", "szp", "formats users run without a bound"),
    ("baselines", "rtn4", "always measured"), ("baselines", "q9_k", "unknown")])
def test_bad_options_are_clear_errors(tmp_path, field, value, match):
    from profiles.errors import MoeszError

    req = {**TINY, field: value}
    with pytest.raises(MoeszError, match=match):
        profile_model(ProfileRequest(out=tmp_path / "p", **req))
    assert not (tmp_path / "p" / "profile.json").exists()


@pytest.mark.slow
def test_two_real_workers_share_one_journal(tmp_path):
    """Two `moesz profile model` processes on one journal storage: every point runs once."""
    journal = tmp_path / "shared.journal"
    args = ["profile", "model", "builtin", "--codecs", "szp", "--levels", "0.5,1,2",
            "--layers", "2,5", "--groups", "none", "--limit", "8", "--storage",
            f"journal:{journal}", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "planner", *args, "--out",
                               str(tmp_path / f"w{i}")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    summaries = [json.loads(o) for o, _ in outs]
    assert all(s["complete"] for s in summaries)
    assert sum(s["ran_now"] for s in summaries) == summaries[0]["points_total"] == 9
    import optuna

    trials = optuna.load_study(study_name="moesz-sensitivity", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal)))).trials
    done = [t.user_attrs["point"] for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == len(set(done)) == 9
    assert not [t for t in trials if t.state.name in ("FAIL", "RUNNING", "WAITING")]


@pytest.mark.slow
def test_paper_design_runs_noise_next_to_the_real_codec(tmp_path):
    res = profile_model(ProfileRequest(model="builtin", out=tmp_path / "paper", design="paper",
                                       layers="0", groups="G1=0-1", codecs="szp", limit=8))
    s = res.profile.sensitivity
    assert set(s.surrogate) == {"gaussian", "none"} and set(s.level) == {0.1, 0.3, 0.5, 0.8}
    assert set(s.experts) == {"top:1", "expert:0", "top:6", "all"}
    from profiles.profiling.summary import paper_table

    title, header, rows = paper_table(res.profile)
    assert rows[0][0] == "baseline" and len(header) == 2 + 4
    assert not math.isnan(s.kl_nats.max())


def test_baselines_are_whole_model_points_with_ratios_at_every_layer(tmp_path):
    """--baselines q4_k,nf4 with one layer profiled: one whole-model point each, and their
    ratios at every MoE layer (the whole-model policy needs them), not only at layer 3."""
    import pandas as pd

    res = profile_model(ProfileRequest(out=tmp_path / "p", baselines="q4_k,nf4",
                                       **{**TINY, "codecs": "szp"}))
    sens = pd.read_parquet(tmp_path / "p" / SENSITIVITY_FILE)
    fmt = sens[sens.codec.isin(["q4_k", "nf4"])]
    assert set(fmt.target) == {"all"} and set(fmt.codec) == {"q4_k", "nf4"}
    ratios = pd.read_parquet(tmp_path / "p" / RATIOS_FILE)
    layers = set(res.profile.geometry["moe_layers"])
    for codec in ("q4_k", "nf4", "rtn4"):
        assert set(ratios[ratios.codec == codec].layer) == layers, codec
    assert set(ratios[ratios.codec == "szp"].layer) == {3}
    # Q4_K: 4.5 bits a weight (+ blob headers) against bf16's 16
    q4 = ratios[ratios.codec == "q4_k"]
    assert (q4.ratio_vs_bf16 < 16 / 4.5).all() and (q4.ratio_vs_bf16 > 3.3).all()
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["baselines"] == ["q4_k",
                                                                                      "nf4"]


def test_resumed_ratios_tell_codec_options_apart():
    """A ratio row of `gq` at 4 bits does not stand in for `gq` at 3 bits when a profile
    resumes; the same options (written out or left at their defaults) are skipped."""
    from profiles.models.source import FileExperts
    from profiles.profiling.ratios import done_key, measure_ratios

    src = FileExperts.open("builtin")
    first = measure_ratios(src, ["gq"], "meanabs", [1.0], sample=1, layers=[3])
    done = {done_key(r.layer, r.codec, r.level, r.codec_options) for r in first.itertuples()}
    again = measure_ratios(src, ["gq"], "meanabs", [1.0], sample=1, layers=[3], done_keys=done,
                           codec_options={"gq": {"bits": 4, "group": 64}})
    assert len(again) == 0
    three = measure_ratios(src, ["gq"], "meanabs", [1.0], sample=1, layers=[3], done_keys=done,
                           codec_options={"gq": {"bits": 3}})
    assert list(three.codec) == ["gq"] and json.loads(three.codec_options[0]) == {"bits": 3}
    assert three.ratio[0] > first[first.codec == "gq"].ratio.iloc[0]
