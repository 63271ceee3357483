"""Golden makespans on hand-computable cases, conservation of bytes, determinism, errors.

Test hardware (tests/sim/conftest.py): link 0.5 ms + 1 MB / (1 GB/s) = L = 1.5 ms per 1 MB
expert, expert compute C = 0.25 ms per token, attention and LM head 0, SSD 1 ms + bytes / 0.5 GB/s.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.errors import ConfigError, ProfileError
from profiles.serving import ServingConfig, parse_mem
from sim.api import make_workload, simulate
from sim.costs import uniform_costs
from sim.engine import SimOptions
from sim.shape import kv_bytes_per_token
from sim.synthetic import SyntheticSpec
from sim.timeline import chrome_trace, plot_gantt, spans_of
from tests.sim.conftest import MB, make_geometry, make_hardware, trace_df

L_S, C_S = 0.0015, 0.00025  # link time of a 1 MB expert, compute time of one expert


def serving_with_cache(g, cache_bytes, **kw):
    """A ServingConfig whose GPU budget leaves exactly `cache_bytes` for the expert cache."""
    base = dict(prompt_tokens=0, generated_tokens=kw.pop("generated_tokens", 10), staging_slots=2)
    base.update(kw)
    sv = ServingConfig(**base)
    kv = kv_bytes_per_token(g) * sv.batch_size * (sv.prompt_tokens + sv.generated_tokens)
    budget = g.non_expert_bytes + kv + sv.staging_slots * g.bytes_per_expert + cache_bytes
    return ServingConfig(**{**base, "gpu_mem_bytes": int(budget)})


def run(g, hw, sv, traces, costs=None, **opt):
    wl = make_workload(g, sv, traces=traces)
    costs = costs or uniform_costs(g.moe_layers, g.experts_per_layer, original_bytes=g.bytes_per_expert)
    return simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl,
                    options=SimOptions(**opt))


def distinct_steps(n, top_k=2, experts=4):
    """Each step uses the next top_k experts round robin (so a small cache always misses)."""
    return [[tuple((t * top_k + r) % experts for r in range(top_k))] for t in range(n)]


def test_one_layer_all_misses_no_overlap(hardware):
    g = make_geometry()
    sv = serving_with_cache(g, 0)
    r = run(g, hardware, sv, trace_df(distinct_steps(10)), pipeline=False).result
    # every expert: latency + bytes / bandwidth, then its compute, one after the other
    assert r.decode_s == pytest.approx(10 * 2 * (L_S + C_S), rel=1e-12)
    assert r.misses == 20 and r.hits == 0 and r.transfers == 20


def test_one_layer_all_misses_pipelined(hardware):
    g = make_geometry()
    sv = serving_with_cache(g, 0)
    r = run(g, hardware, sv, trace_df(distinct_steps(10))).result
    # the second transfer overlaps the first expert's compute: L + L + C per step
    assert r.decode_s == pytest.approx(10 * (2 * L_S + C_S), rel=1e-12)
    assert r.tokens_per_s == pytest.approx(1 / (2 * L_S + C_S), rel=1e-12)
    assert r.link_busy_fraction == pytest.approx(2 * L_S / (2 * L_S + C_S), rel=1e-9)


@pytest.mark.parametrize("mode", ["stream", "compute"])
def test_gpu_decode_stage_is_pipelined(hardware, mode):
    g = make_geometry()
    sv = serving_with_cache(g, 0, gpu_decode=mode, generated_tokens=5)
    D = 0.0004
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB, stored_bytes=MB, gpu_decode_s=D)
    r = run(g, hardware, sv, trace_df(distinct_steps(5)), costs=costs).result
    # flow shop of 2 identical jobs over link -> decode -> compute: L + D + C + max(L, D, C)
    assert r.decode_s == pytest.approx(5 * (L_S + D + C_S + L_S), rel=1e-12)
    if mode == "stream":
        assert r.decode_busy_fraction == pytest.approx(2 * D / (2 * L_S + D + C_S), rel=1e-9)


def test_unlimited_memory_no_transfers_after_warm_up(hardware):
    g = make_geometry(experts=8)
    steps = distinct_steps(40, experts=8)
    r = run(g, hardware, ServingConfig(prompt_tokens=0, generated_tokens=40), trace_df(steps)).result
    assert r.transfers == 8  # each expert once, then always a hit
    assert r.misses == 8 and r.hits == 80 - 8
    assert r.bytes_h2d == 8 * MB


def test_bytes_moved_equal_misses_times_compressed_bytes(hardware):
    g = make_geometry()
    sv = serving_with_cache(g, 0)
    stored = MB // 4
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB, stored_bytes=stored,
                          gpu_decode_s=0.0001)
    r = run(g, hardware, sv, trace_df(distinct_steps(10)), costs=costs).result
    assert r.bytes_h2d == r.misses * stored == 20 * stored
    # a 250 kB transfer: 0.5 ms + 0.25 ms
    assert r.decode_s == pytest.approx(10 * (0.00075 + 0.0001 + C_S + 0.00075), rel=1e-12)


def test_host_budget_below_experts_reads_ssd(hardware):
    g = make_geometry()
    # a host LRU of two experts, empty at the start, as the runtime's disk tier: steps (0,1),
    # (0,1), (2,3) repeated read (0,1), hit them, read (2,3) evicting them, read (0,1) again ...
    steps = [[(0, 1)], [(0, 1)], [(2, 3)]] * 4
    sv = serving_with_cache(g, 0, generated_tokens=12, host_mem_bytes=2 * MB)
    r = run(g, hardware, sv, trace_df(steps)).result
    assert r.host_mem_bytes == 2 * MB
    assert r.ssd_reads == 8 * 2 and r.bytes_ssd == 16 * MB
    ssd = 0.001 + MB / 0.5e9  # 3 ms per 1 MB read, one at a time (the profile has no depth curve)
    # host steps: L + L + C; SSD steps: ssd, then the second read beside the first copy: 2 ssd + L + C
    expect = 4 * (2 * L_S + C_S) + 8 * (ssd + L_S + C_S + ssd)
    assert r.decode_s == pytest.approx(expect, rel=1e-12)


def test_static_hot_pins_and_serves_misses_from_staging(hardware):
    g = make_geometry()
    steps = [[(0, 1)], [(0, 2)], [(0, 3)], [(0, 1)]]
    sv = serving_with_cache(g, MB, generated_tokens=4, cache_policy="static-hot")
    r = run(g, hardware, sv, trace_df(steps)).result
    assert r.hits == 4 and r.misses == 4 and r.transfers == 4  # expert 0 pinned, others staged
    assert r.decode_s == pytest.approx(4 * (L_S + C_S), rel=1e-12)


def test_on_miss_cpu_runs_misses_on_cpu(hardware):
    g = make_geometry()
    sv = serving_with_cache(g, MB, generated_tokens=4, cache_policy="static-hot", on_miss="cpu")
    steps = [[(0, 1)], [(0, 2)], [(0, 3)], [(0, 1)]]
    r = run(g, hardware, sv, trace_df(steps)).result
    assert r.cpu_expert_runs == 4 and r.transfers == 0 and r.bytes_h2d == 0
    assert r.decode_s == pytest.approx(4 * 0.002, rel=1e-12)  # CPU expert 2 ms > GPU hit 0.25 ms


def test_oracle_prefetch_shares_one_transfer_per_miss(hardware):
    g = make_geometry(num_layers=3, experts=4, top_k=2)
    sv = serving_with_cache(g, 0, generated_tokens=20, prompt_tokens=0, prefetch="oracle")
    wl_sv = ServingConfig(prompt_tokens=0, generated_tokens=20)
    wl = make_workload(g, wl_sv, synthetic=SyntheticSpec(1.0, 0.0, 3))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    r = simulate(geometry=g, hardware=hardware, serving=sv, costs=costs, workload=wl).result
    base = simulate(geometry=g, hardware=hardware, serving=ServingConfig(
        **{**sv.to_dict(), "prefetch": "none"}), costs=costs, workload=wl).result
    accesses = 20 * 3 * 2
    assert r.transfers == accesses == base.transfers  # prefetch + demand never move one twice
    assert r.bytes_h2d_prefetch == 20 * 2 * 2 * MB  # layers 1 and 2 are prefetched
    assert r.tokens_per_s > base.tokens_per_s


def test_determinism_with_prefetch_errors(hardware):
    g = make_geometry(num_layers=3, experts=8, top_k=2)
    sv = serving_with_cache(g, 3 * MB, generated_tokens=30, prefetch="next:0.5", prompt_tokens=4)
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.1, 0.2, 7))
    costs = uniform_costs(g.moe_layers, 8, original_bytes=MB)
    a = simulate(geometry=g, hardware=hardware, serving=sv, costs=costs, workload=wl,
                 options=SimOptions(seed=5)).result
    b = simulate(geometry=g, hardware=hardware, serving=sv, costs=costs, workload=wl,
                 options=SimOptions(seed=5)).result
    assert a.to_dict() == b.to_dict()
    wl2 = make_workload(g, sv, synthetic=SyntheticSpec(1.1, 0.2, 7))
    c = simulate(geometry=g, hardware=hardware, serving=sv, costs=costs, workload=wl2,
                 options=SimOptions(seed=5)).result
    assert c.to_dict() == a.to_dict()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), cache_experts=st.integers(0, 12),
       policy=st.sampled_from(["lru", "lfu", "static-hot"]),
       prefetch=st.sampled_from(["none", "next:0.7", "oracle"]), stored=st.integers(1, MB))
def test_bytes_are_conserved(seed, cache_experts, policy, prefetch, stored):
    hw = make_hardware()
    g = make_geometry(num_layers=2, experts=6, top_k=2)
    sv = serving_with_cache(g, cache_experts * MB, generated_tokens=15, prompt_tokens=2,
                            cache_policy=policy, prefetch=prefetch)
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.0, 0.3, seed))
    costs = uniform_costs(g.moe_layers, 6, original_bytes=MB, stored_bytes=stored,
                          gpu_decode_s=1e-5)
    r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl,
                 options=SimOptions(seed=seed)).result
    assert r.bytes_h2d == r.transfers * stored
    assert r.bytes_h2d_prefetch <= r.bytes_h2d
    assert r.gpu_mem_bytes <= sv.gpu_mem_bytes
    assert 0.0 <= r.link_busy_fraction <= 1.0 and 0.0 <= r.hit_rate <= 1.0
    if prefetch == "none":
        assert r.bytes_h2d_prefetch == 0


def test_zero_bandwidth_link_is_an_error():
    with pytest.raises(ProfileError, match=r"gpu\.h2d_pinned\.gbps.*> 0"):
        make_hardware(**{"gpu.h2d_pinned.gbps": 0})
    with pytest.raises(ConfigError, match="ssd-gbps"):
        SimOptions(ssd_gbps=0.0)


def test_negative_budget_is_an_error():
    with pytest.raises(ConfigError, match="negative"):
        parse_mem("-4GiB", what="--gpu-mem")
    with pytest.raises(ConfigError, match="gpu_mem_bytes"):
        ServingConfig(gpu_mem_bytes=-1)


def test_budget_below_non_expert_weights_is_an_error(hardware):
    g = make_geometry()
    sv = ServingConfig(prompt_tokens=0, generated_tokens=4, gpu_mem_bytes=MB)
    with pytest.raises(ConfigError, match="raise --gpu-mem"):
        run(g, hardware, sv, trace_df(distinct_steps(4)))


def test_trace_naming_missing_expert_is_an_error(hardware):
    g = make_geometry(experts=4)
    with pytest.raises(ProfileError, match="expert 7 of layer 0.*experts 0..3"):
        run(g, hardware, ServingConfig(prompt_tokens=0, generated_tokens=2),
            trace_df([[(0, 7)], [(1, 2)]]))
    with pytest.raises(ProfileError, match="layer 5, which is not an MoE layer"):
        run(g, hardware, ServingConfig(prompt_tokens=0, generated_tokens=2),
            trace_df([[(0, 1)]], layers=(5,)))


def test_timeline_exports(hardware, tmp_path):
    g = make_geometry()
    sv = serving_with_cache(g, 0, generated_tokens=3)
    sim = run(g, hardware, sv, trace_df(distinct_steps(3)), record=True).simulation
    spans = spans_of(sim)
    doc = json.loads(json.dumps(chrome_trace(spans)))
    names = {e["name"] for e in doc["traceEvents"] if e["ph"] == "X"}
    assert {"fetch L0 E0", "expert L0 E0", "decode step"} <= names
    link = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].startswith("fetch")]
    assert len(link) == 6 and link[0]["dur"] == pytest.approx(L_S * 1e6)
    plot_gantt(tmp_path / "g.png", spans)
    assert (tmp_path / "g.png").stat().st_size > 1000
