"""Synthetic traces, trace replay layout and reuse statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from profiles.errors import ConfigError, ProfileError
from sim.reuse import global_stack_distances, reuse_stats
from sim.synthetic import TRACE_COLUMNS, SyntheticSpec, parse_synthetic, synthetic_traces
from sim.workload import build_workload
from tests.sim.conftest import trace_df


def test_synthetic_has_trace_columns_and_is_seeded():
    kw = dict(prompts=2, prompt_tokens=3, decode_tokens=5)
    df = synthetic_traces((1, 3), 16, 4, spec=SyntheticSpec(1.1, 0.0, 4), **kw)
    assert tuple(df.columns) == TRACE_COLUMNS
    assert len(df) == 2 * 8 * 2 * 4
    assert set(df["phase"]) == {"prefill", "decode"} and set(df["layer"]) == {1, 3}
    assert df.groupby(["prompt_id", "phase", "token_idx", "layer"])["expert"].nunique().eq(4).all()
    assert df.equals(synthetic_traces((1, 3), 16, 4, spec=SyntheticSpec(1.1, 0.0, 4), **kw))
    assert not df.equals(synthetic_traces((1, 3), 16, 4, spec=SyntheticSpec(1.1, 0.0, 5), **kw))


def test_zipf_and_locality_shape_the_routing():
    flat = synthetic_traces((0,), 32, 1, prompts=1, prompt_tokens=0, decode_tokens=4000,
                            spec=SyntheticSpec(0.0, 0.0, 0))
    skew = synthetic_traces((0,), 32, 1, prompts=1, prompt_tokens=0, decode_tokens=4000,
                            spec=SyntheticSpec(1.5, 0.0, 0))
    assert flat["expert"].value_counts().iloc[0] < 2.5 * 4000 / 32
    assert skew["expert"].value_counts().iloc[0] > 0.3 * 4000  # p(top) = 1 / zeta-ish(1.5) ~ 0.4
    sticky = synthetic_traces((0,), 32, 1, prompts=1, prompt_tokens=0, decode_tokens=4000,
                              spec=SyntheticSpec(0.0, 0.6, 0))
    repeats = (sticky["expert"].to_numpy()[1:] == sticky["expert"].to_numpy()[:-1]).mean()
    assert repeats == pytest.approx(0.6 + 0.4 / 32, abs=0.04)


def test_parse_synthetic():
    assert parse_synthetic("zipf:1.1") == SyntheticSpec(1.1, 0.0, 0)
    assert parse_synthetic("zipf:0.8,locality:0.3,seed:9") == SyntheticSpec(0.8, 0.3, 9)
    for bad in ("uniform", "zipf:x", "zipf:1,locality:1.0", "zipf:1,foo:2"):
        with pytest.raises(ConfigError, match="synthetic"):
            parse_synthetic(bad)


def test_batch_union_and_cycling():
    df = pd.concat([trace_df([[(0, 1)], [(2, 3)]], prompt_id=0),
                    trace_df([[(1, 2)], [(3, 0)]], prompt_id=1)], ignore_index=True)
    wl = build_workload(df, moe_layers=(0,), experts_per_layer=4, top_k=2, batch_size=2,
                        prompt_tokens=0, generated_tokens=3)
    steps = wl.decode_steps
    assert steps[0].layers[0] == ((0, 1, 2), (1, 2, 1))  # expert 1 serves both tokens
    assert steps[1].layers[0] == ((0, 2, 3), (1, 1, 2))
    assert steps[2].layers[0] == steps[0].layers[0]  # replay cycled
    assert any("cycles" in n for n in wl.notes)
    assert wl.decode_counts.tolist() == [[3, 2, 3, 1]]
    assert wl.hot_order()[:2] == [(0, 0), (0, 2)]


def test_incomplete_trace_is_an_error():
    df = trace_df([[(0, 1)], [(2, 3)]])
    with pytest.raises(ProfileError, match="token 1 of prompt 0 has 1 routing rows"):
        build_workload(df.iloc[:-1], moe_layers=(0,), experts_per_layer=4, top_k=2,
                       batch_size=1, prompt_tokens=0, generated_tokens=2)
    with pytest.raises(ProfileError, match="missing trace column"):
        build_workload(df.drop(columns=["gate"]), moe_layers=(0,), experts_per_layer=4, top_k=2,
                       batch_size=1, prompt_tokens=0, generated_tokens=2)


def test_stack_distances_by_hand():
    # one layer, top-1: A B A C B A over 6 decode steps, no prefill: cold = N + 1 = 5
    df = trace_df([[(e,)] for e in (0, 1, 0, 2, 1, 0)])
    wl = build_workload(df, moe_layers=(0,), experts_per_layer=4, top_k=1, batch_size=1,
                        prompt_tokens=0, generated_tokens=6)
    d = [int(x[0][0]) for x in global_stack_distances(wl)]
    assert d == [5, 5, 2, 5, 3, 3]
    st = reuse_stats(wl)
    assert st.union_mean.tolist() == [1.0]
    # a 3-expert LRU hits the last three accesses
    assert st.lru_hit_le[0, 3] == 3 and st.lru_hit_le[0, 2] == 1
    # mean distinct experts in windows of 1, 2 and 6 steps
    assert st.distinct[0, 1] == pytest.approx(1.0)
    assert st.distinct[0, 2] == pytest.approx(2.0)
    assert st.distinct[0, 6] == pytest.approx(3.0)
    # hot order: expert 0 (3 uses), 1 (2), 2 (1): static-hot with 1 slot hits 3 of 6
    assert st.rank_lt[0, 1] == 3 and st.layer_rank_lt[0, 2] == 5
    assert np.all(np.diff(st.hit_le[0]) >= 0)


def test_placement_traces_rank_static_placements():
    """Placement traces change which experts rank hot; the replayed steps stay the same."""
    from sim.workload import with_placement

    replay = trace_df([[(0, 1)], [(0, 2)], [(0, 1)]])
    other = pd.concat([trace_df([[(3, 2)], [(3, 1)]], prompt_id=5),
                       trace_df([[(3, 2)]], prompt_id=6)], ignore_index=True)
    wl = build_workload(replay, moe_layers=(0,), experts_per_layer=4, top_k=2, batch_size=1,
                        prompt_tokens=0, generated_tokens=3)
    assert wl.hot_order()[:2] == [(0, 0), (0, 1)]  # the oracle: the replayed traces' own counts
    placed = with_placement(wl, other, source="other.parquet")
    assert placed.steps == wl.steps and placed.decode_counts.tolist() == [[3, 2, 1, 0]]
    assert placed.placement_counts.tolist() == [[0, 1, 2, 3]]  # every placement token once
    assert placed.hot_order() == [(0, 3), (0, 2), (0, 1), (0, 0)]
    assert any("other.parquet" in n for n in placed.notes)
    with pytest.raises(ProfileError, match="expert 7"):
        with_placement(wl, trace_df([[(7, 1)]]), source="bad.parquet")


def test_synthetic_token_idx_continues_after_the_prompt():
    """Synthetic traces number tokens as recorded ones do: one sequence per prompt."""
    df = synthetic_traces((0, 1), 8, 2, prompts=2, prompt_tokens=3, decode_tokens=4)
    for _, rows in df.groupby("prompt_id"):
        pre, dec = rows[rows["phase"] == "prefill"], rows[rows["phase"] == "decode"]
        assert sorted(pre["token_idx"].unique()) == [0, 1, 2]
        assert sorted(dec["token_idx"].unique()) == [3, 4, 5, 6]


def test_placement_counts_every_decode_token_once_at_any_batch():
    """Prompts of different lengths, batch 2: each token counts once per expert it used."""
    from sim.workload import with_placement

    replay = trace_df([[(0, 1)], [(0, 2)]])
    other = pd.concat([trace_df([[(1, 0)]], prompt_id=0), trace_df([[(2, 0)]], prompt_id=1),
                       trace_df([[(3, 0)]] * 4, prompt_id=2)], ignore_index=True)
    wl = build_workload(replay, moe_layers=(0,), experts_per_layer=4, top_k=2, batch_size=2,
                        prompt_tokens=0, generated_tokens=2)
    placed = with_placement(wl, other, source="other")
    assert placed.placement_counts.tolist() == [[6, 1, 1, 4]]
    assert placed.hot_order()[:2] == [(0, 0), (0, 3)]
