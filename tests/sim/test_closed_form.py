"""The closed-form cost model against the simulation, and a case where they must disagree."""

from __future__ import annotations

import numpy as np
import pytest

from profiles.errors import ConfigError
from profiles.serving import ServingConfig
from sim.api import make_workload, simulate
from sim.closed_form import ClosedFormModel
from sim.costs import uniform_costs
from sim.synthetic import SyntheticSpec
from tests.sim.conftest import MB, make_geometry, make_hardware, trace_df
from tests.sim.test_engine import serving_with_cache


def _both(g, hw, sv, wl, costs):
    sim = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    cf = ClosedFormModel(hw, g, sv, wl)
    return sim, cf, cf.tokens_per_s_costs(costs)


@pytest.mark.parametrize("cache", ["lru", "static-hot"])
@pytest.mark.parametrize("batch", [1, 2])
def test_closed_form_agrees_with_simulation_on_steady_decode(cache, batch):
    hw = make_hardware()
    g = make_geometry(num_layers=6, experts=16, top_k=2)
    costs = uniform_costs(g.moe_layers, 16, original_bytes=MB, stored_bytes=MB // 3,
                          gpu_decode_s=0.0003)
    for cache_experts in (6, 24, 64):
        sv = serving_with_cache(g, cache_experts * MB, generated_tokens=150, prompt_tokens=4,
                                cache_policy=cache, batch_size=batch)
        wl = make_workload(g, sv, synthetic=SyntheticSpec(1.0, 0.2, 11))
        sim, _, cf = _both(g, hw, sv, wl, costs)
        assert cf == pytest.approx(sim.tokens_per_s, rel=0.10), (cache, batch, cache_experts)


def test_closed_form_agrees_with_per_layer_slots():
    hw = make_hardware()
    g = make_geometry(num_layers=4, experts=16, top_k=2)
    costs = uniform_costs(g.moe_layers, 16, original_bytes=MB)
    sv = serving_with_cache(g, 40 * MB, generated_tokens=150, per_layer_cache_slots=(2, 4, 8, 10))
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.2, 0.1, 3))
    sim, _, cf = _both(g, hw, sv, wl, costs)
    assert cf == pytest.approx(sim.tokens_per_s, rel=0.10)


def test_hand_computed_case_where_they_disagree():
    """One layer, top-2, static-hot holding expert 0 only; compute C = 2 ms > link L = 1 ms.

    Steps alternate {0, 1} (one miss, hidden behind the hit's compute: 2C = 4 ms) and {2, 3}
    (two misses: L + 2C = 5 ms), so the simulation takes 4.5 ms per step. The closed form sees
    1.5 misses per step on average: max(2C, L + C + 0.5 * max(L, C)) = 4 ms. It cannot tell
    misses spread over all steps from misses bunched in half of them.
    """
    hw = make_hardware(**{"gpu.h2d_pinned.latency_s": 0.0,
                          "model_timings.0.expert_ffn.seconds": [0.002, 0.004]})
    g = make_geometry()
    steps = [[(0, 1)], [(2, 3)]] * 10
    sv = serving_with_cache(g, MB, generated_tokens=20, cache_policy="static-hot")
    wl = make_workload(g, sv, traces=trace_df(steps))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    sim, cf_model, cf = _both(g, hw, sv, wl, costs)
    assert sim.tpot_s == pytest.approx(0.0045, rel=1e-12)
    assert 1 / cf == pytest.approx(0.0040, rel=1e-12)


def test_static_hot_closed_form_is_exact_when_misses_are_link_bound():
    hw = make_hardware()
    g = make_geometry(num_layers=2, experts=8, top_k=2)
    costs = uniform_costs(g.moe_layers, 8, original_bytes=MB)
    sv = serving_with_cache(g, 5 * MB, generated_tokens=60, cache_policy="static-hot")
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.0, 0.0, 2))
    sim, _, cf = _both(g, hw, sv, wl, costs)
    assert cf == pytest.approx(sim.tokens_per_s, rel=1e-9)


def test_vectorized_matches_scalar_and_validates():
    hw = make_hardware()
    g = make_geometry(num_layers=3, experts=8, top_k=2)
    sv = serving_with_cache(g, 6 * MB, generated_tokens=40)
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.0, 0.0, 1))
    cf = ClosedFormModel(hw, g, sv, wl)
    rng = np.random.default_rng(0)
    b = rng.uniform(0.2, 1.0, size=(5, 3)) * MB
    gb = rng.uniform(0.5, 5.0, size=(5, 3))
    many = cf.tokens_per_s_many(b, gb)
    one = [cf.tokens_per_s(b[i], gb[i]) for i in range(5)]
    assert many == pytest.approx(one, rel=1e-12)
    # smaller experts never predict fewer tokens/s (the link is the bottleneck here)
    assert cf.tokens_per_s(np.full(3, MB / 4)) >= cf.tokens_per_s(np.full(3, MB))
    with pytest.raises(ConfigError, match="3 MoE layers"):
        cf.tokens_per_s(np.full(2, MB))
    with pytest.raises(ConfigError, match="> 0"):
        cf.tokens_per_s(np.zeros(3))


def test_compressed_residency_uses_per_layer_sizes():
    hw = make_hardware()
    g = make_geometry(num_layers=3, experts=8, top_k=2)
    sv = serving_with_cache(g, 8 * MB, generated_tokens=60, resident_form="compressed")
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.0, 0.0, 4))
    cf = ClosedFormModel(hw, g, sv, wl)
    gb = np.full(3, 10.0)
    small = cf.tokens_per_s(np.full(3, MB / 8), gb)  # 8x more experts fit the cache
    large = cf.tokens_per_s(np.full(3, MB / 1.01), gb)
    assert small > large
    costs = uniform_costs(g.moe_layers, 8, original_bytes=MB, stored_bytes=MB // 4,
                          gpu_decode_s=0.0001, resident_compressed=True)
    sim = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert cf.tokens_per_s_costs(costs) == pytest.approx(sim.tokens_per_s, rel=0.25)


def test_notes_for_what_the_closed_form_leaves_to_the_simulation():
    hw = make_hardware()
    g = make_geometry(num_layers=2, experts=8)
    sv = ServingConfig(prompt_tokens=0, generated_tokens=10, cache_policy="lfu", prefetch="oracle")
    wl = make_workload(g, sv, synthetic=SyntheticSpec())
    notes = " ".join(ClosedFormModel(hw, g, sv, wl).notes)
    assert "LFU as LRU" in notes and "prefetch" in notes


@pytest.mark.parametrize("on_miss", ["fetch", "cpu"])
def test_closed_form_agrees_for_cpu_decode_and_cpu_execution(on_miss):
    hw = make_hardware()
    g = make_geometry(num_layers=4, experts=16, top_k=2)
    # a CPU codec: the host decodes (2 ms per expert over all threads), the link carries raw bytes
    costs = uniform_costs(g.moe_layers, 16, original_bytes=MB, stored_bytes=MB // 2,
                          cpu_decode_s=0.002)
    sv = serving_with_cache(g, 20 * MB, generated_tokens=150, cache_policy="static-hot",
                            on_miss=on_miss)
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.0, 0.1, 5))
    sim, _, cf = _both(g, hw, sv, wl, costs)
    assert sim.bytes_h2d == sim.transfers * (MB if on_miss == "fetch" else 0)
    assert cf == pytest.approx(sim.tokens_per_s, rel=0.10)
