"""Routing traces from real router hooks, their parquet files and their statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from profiles.errors import ProfileError
from profiles.evaluation.generate import greedy_generate
from profiles.models import build_expert_map, load_model
from profiles.tasks import CharTokenizer
from profiles.traces import (TRACE_COLUMNS, RouterRecorder, entropy_bits, gini, read_traces,
                             record_traces, trace_stats, write_traces)
from tests.fixtures_models import ARCHITECTURES, MOE_LAYERS, TOP_K, tiny_model
from tests.profiles.eval_helpers import one_torch_thread, save_tiny_checkpoint  # noqa: F401

PROMPTS = ["347+589=", "1=", "S583920=", "12-3=", "R5839201="]  # lengths differ: left padding


def _trace(model, prompts, batch_size, max_new_tokens=5, task="t"):
    emap = build_expert_map(model)
    recorder = RouterRecorder(emap, range(len(prompts)), [task] * len(prompts))
    with recorder:
        gens = greedy_generate(model, CharTokenizer(), prompts, max_new_tokens, batch_size,
                               on_forward=recorder.on_forward)
    return recorder.frame(), gens, emap


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_row_per_real_token_layer_and_rank(arch):
    model = tiny_model(arch, vocab_size=CharTokenizer().vocab_size)
    df, gens, emap = _trace(model, PROMPTS, batch_size=8)
    assert tuple(df.columns) == TRACE_COLUMNS
    layers = MOE_LAYERS[arch]
    for pid, gen in enumerate(gens):
        rows = df[df["prompt_id"] == pid]
        pre, dec = rows[rows["phase"] == "prefill"], rows[rows["phase"] == "decode"]
        assert len(pre) == gen.prompt_tokens * len(layers) * TOP_K  # padding never recorded
        assert len(dec) == gen.fed_tokens * len(layers) * TOP_K
        assert sorted(pre["token_idx"].unique()) == list(range(gen.prompt_tokens))
        assert sorted(dec["token_idx"].unique()) == list(
            range(gen.prompt_tokens, gen.prompt_tokens + gen.fed_tokens))
    assert set(df["layer"]) == set(layers) and set(df["rank"]) == set(range(TOP_K))
    assert df["expert"].between(0, emap.experts_per_layer - 1).all()
    assert np.isfinite(df["gate"]).all()
    per_token = df.groupby(["prompt_id", "token_idx", "layer"])
    assert (per_token["expert"].nunique() == TOP_K).all()  # distinct experts per token
    assert (per_token["gate"].apply(lambda g: bool((np.diff(g.to_numpy()) <= 0).all()))).all()


def test_batched_traces_equal_each_prompt_traced_alone():
    """Left-padded batching records exactly the routing of each prompt run on its own."""
    model = tiny_model("qwen3_moe", vocab_size=CharTokenizer().vocab_size)
    batched, _, _ = _trace(model, PROMPTS, batch_size=5)
    for pid, prompt in enumerate(PROMPTS):
        alone, _, _ = _trace(model, [prompt], batch_size=1)
        mine = batched[batched["prompt_id"] == pid].reset_index(drop=True)
        assert mine[["phase", "token_idx", "layer", "rank", "expert"]].equals(
            alone[["phase", "token_idx", "layer", "rank", "expert"]])
        assert np.allclose(mine["gate"], alone["gate"], atol=1e-5)


def test_record_traces_end_to_end_and_parquet_round_trip(tmp_path):
    loaded = load_model(str(save_tiny_checkpoint("olmoe", tmp_path / "m")))
    seen = []
    rec = record_traces(loaded, ["add", "sort"], "profile", limit=3,
                        progress=lambda d, t, label: seen.append((d, t)))
    assert seen[-1] == (6, 6) and rec.tasks == ("add",) * 3 + ("sort",) * 3
    df = rec.frame
    assert list(df[df["prompt_id"] == 4]["task"].unique()) == ["sort"]
    expected = sum(g.prompt_tokens + g.fed_tokens for g in rec.generations)
    assert len(df) == expected * len(loaded.geometry.moe_layers) * loaded.geometry.top_k
    path = tmp_path / "trace.parquet"
    write_traces(df, path)
    back = read_traces(path)
    assert tuple(back.columns) == TRACE_COLUMNS
    pd.testing.assert_frame_equal(back, df)


def test_the_simulator_replays_recorded_traces(tmp_path):
    from sim.workload import build_workload

    loaded = load_model(str(save_tiny_checkpoint("mixtral", tmp_path / "m")))
    g = loaded.geometry
    df = record_traces(loaded, ["add"], "profile", limit=4).frame
    wl = build_workload(df, moe_layers=g.moe_layers, experts_per_layer=g.experts_per_layer,
                        top_k=g.top_k, batch_size=2, prompt_tokens=4, generated_tokens=3)
    assert wl.decode_counts.sum() > 0


def test_trace_files_with_other_columns_are_refused(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt_id": [0], "expert": [1]}).to_parquet(path)
    with pytest.raises(ProfileError, match="expected exactly"):
        read_traces(path)
    with pytest.raises(ProfileError, match="no such trace file"):
        read_traces(tmp_path / "none.parquet")


def test_balance_measures_on_known_counts():
    assert gini([5, 5, 5, 5]) == 0.0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n - 1) / n
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)
    assert entropy_bits([3] * 8) == pytest.approx(3.0)
    assert entropy_bits([0, 7, 0]) == 0.0 and entropy_bits([0, 0]) == 0.0


def _hand_trace(experts_by_token, prompt_id=0, phase="decode", start=0):
    return pd.DataFrame({"prompt_id": prompt_id, "task": "t", "phase": phase,
                         "token_idx": np.arange(start, start + len(experts_by_token)),
                         "layer": 3, "rank": 0, "expert": experts_by_token,
                         "gate": np.float32(1.0)})[list(TRACE_COLUMNS)]


def test_reuse_gaps_and_stack_distances_by_hand():
    # expert sequence 0 1 0 2 1: reuses at token 2 (expert 0, gap 2, expert 1 in between) and
    # token 4 (expert 1, gap 3, experts 0 and 2 in between); three first uses
    df = _hand_trace([0, 1, 0, 2, 1])
    s = trace_stats(df, experts_per_layer=4)
    (layer,) = s.layers
    assert (layer.layer, layer.tokens, layer.activations) == (3, 5, (2, 2, 1, 0))
    assert layer.reuse_gap_mean_tokens == pytest.approx(2.5)
    assert layer.stack_distance_mean == pytest.approx(1.5)
    assert layer.first_uses == 3
    assert layer.entropy_ratio == pytest.approx(entropy_bits([2, 2, 1, 0]) / 2)
    # reuse is per prompt: a second prompt starts cold
    two = pd.concat([df, _hand_trace([0, 0], prompt_id=1)])
    st2 = trace_stats(two, experts_per_layer=4).layers[0]
    assert st2.first_uses == 4 and st2.reuse_gap_median_tokens == 2.0  # gaps 2, 3 and 1
    assert trace_stats(df, 4, phase="prefill").layers == ()
