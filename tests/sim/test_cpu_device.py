"""The CPU as the runtime's device, the disk tier with several reads in flight, and every SSD
override reaching the closed form.

Test hardware (tests/sim/conftest.py) with `gpu.device_type` "cpu": copy 0.5 ms + 1 MB / (1 GB/s)
= L = 1.5 ms per 1 MB expert, expert compute C = 0.25 ms per token, attention and LM head 0.
"""

from __future__ import annotations

import pytest

from profiles.errors import ConfigError
from profiles.policy import Policy
from sim.api import make_workload, simulate, simulate_policy
from sim.closed_form import ClosedFormModel
from sim.costs import build_costs, uniform_costs
from sim.engine import SimOptions, with_disk_override
from sim.ratios import SyntheticRatios
from sim.synthetic import SyntheticSpec
from tests.sim.conftest import MB, make_geometry, make_hardware, trace_df
from tests.sim.test_engine import C_S, L_S, distinct_steps, serving_with_cache

# a disk whose aggregate GB/s grows with reads in flight: 0.5 GB/s one at a time, 0.8 with two
CURVE = {"sizes": [MB], "depths": [1, 2], "gbps": [[0.5, 0.8]], "best_depth": 2,
         "method": "O_DIRECT", "source": "measured"}


def cpu_hardware(**changes):
    return make_hardware(**{"gpu.device_type": "cpu", **changes})


def test_cpu_device_runs_copy_and_compute_one_after_another():
    """Two misses per step on the CPU device: nothing overlaps, 2 x (copy + compute) a step
    (a GPU overlaps the second copy with the first compute: L + L + C)."""
    g = make_geometry()
    sv = serving_with_cache(g, 0, generated_tokens=5)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(5)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    cpu = simulate(geometry=g, hardware=cpu_hardware(), serving=sv, costs=costs, workload=wl)
    gpu = simulate(geometry=g, hardware=make_hardware(), serving=sv, costs=costs, workload=wl)
    assert cpu.result.decode_s == pytest.approx(5 * 2 * (L_S + C_S), rel=1e-12)
    assert gpu.result.decode_s == pytest.approx(5 * (2 * L_S + C_S), rel=1e-12)
    assert any("the CPU" in lab for lab in cpu.result.labels)
    # busy fractions stay per track on the shared device
    assert cpu.result.link_busy_fraction == pytest.approx(2 * L_S / (2 * (L_S + C_S)), rel=1e-9)
    assert cpu.result.compute_busy_fraction == pytest.approx(2 * C_S / (2 * (L_S + C_S)),
                                                             rel=1e-9)


@pytest.mark.parametrize("depth, step_s", [
    # one read at a time: read0 0-2 ms, copy0 2-2.6; read1 2-4, copy1 4-4.6, compute 4.6-4.85
    (1, 0.002 + 0.002 + 0.0006 + C_S),
    # two in flight at 0.8 GB/s together: both read 0-2.5 ms, copies 2.5-3.1-3.7, compute 3.7-3.95
    (2, 0.0025 + 2 * 0.0006 + C_S),
])
def test_disk_tier_golden_with_reads_in_flight(depth, step_s):
    g = make_geometry()
    hw = make_hardware(**{"host.disk_curve": CURVE, "gpu.h2d_pinned.gbps": 10.0})  # L = 0.6 ms
    sv = serving_with_cache(g, 0, generated_tokens=4, host_mem_bytes=1, disk_depth=depth)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert r.ssd_reads == 8 and r.bytes_ssd == 8 * MB and r.disk_depth == depth
    assert r.decode_s == pytest.approx(4 * step_s, rel=1e-9)
    assert 0 < r.disk_busy_fraction <= 1


def test_each_record_read_from_disk_is_checked_by_its_reader():
    """With a measured CRC32 speed (1 GB/s: 1 ms per 1 MB record) each read takes that much more:
    two in flight, both read and checked by 3.5 ms, copies to 4.7 ms, compute to 4.95 ms."""
    g = make_geometry()
    hw = make_hardware(**{"host.disk_curve": CURVE, "gpu.h2d_pinned.gbps": 10.0,
                          "host.record_check_gbps": {"value": 1.0, "source": "measured"}})
    sv = serving_with_cache(g, 0, generated_tokens=4, host_mem_bytes=1, disk_depth=2)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert r.decode_s == pytest.approx(4 * (0.0035 + 2 * 0.0006 + C_S), rel=1e-9)


def test_the_profile_best_depth_is_the_default_and_the_line_fit_reads_one_at_a_time():
    g = make_geometry()
    sv = serving_with_cache(g, 0, generated_tokens=4, host_mem_bytes=1)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    curve = simulate(geometry=g, hardware=make_hardware(**{"host.disk_curve": CURVE}),
                     serving=sv, costs=costs, workload=wl).result
    line = simulate(geometry=g, hardware=make_hardware(), serving=sv, costs=costs,
                    workload=wl).result
    assert curve.disk_depth == 2 and line.disk_depth == 1


@pytest.mark.parametrize("override", [dict(ssd_gbps=0.25), dict(ssd_latency_s=0.004),
                                      dict(ssd_gbps=2.0, ssd_latency_s=0.0)])
@pytest.mark.parametrize("curve", [False, True])
def test_every_ssd_override_reaches_the_closed_form(override, curve):
    """The simulation and the closed form read the same disk under each override (the override
    replaces the profile's line and drops its depth curve): they agree, and both move with it."""
    g = make_geometry(num_layers=4, experts=16, top_k=2)
    hw = make_hardware(**({"host.disk_curve": CURVE} if curve else {}))
    costs = uniform_costs(g.moe_layers, 16, original_bytes=MB, stored_bytes=MB // 2,
                          gpu_decode_s=0.0003)
    sv = serving_with_cache(g, 8 * MB, generated_tokens=120, host_mem_bytes=1)
    wl = make_workload(g, sv, synthetic=SyntheticSpec(0.0, 0.0, 3))
    opts = SimOptions(**override)
    sim = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl,
                   options=opts).result
    cf = ClosedFormModel(with_disk_override(hw, opts), g, sv, wl).tokens_per_s_costs(costs)
    assert cf == pytest.approx(sim.tokens_per_s, rel=0.10), (override, curve)
    plain = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert sim.tokens_per_s != pytest.approx(plain.tokens_per_s, rel=1e-3)


@pytest.mark.parametrize("policy", [Policy.none(), Policy.uniform("szp", "meanabs", 1.0),
                                    Policy.uniform("sz3", "meanabs", 1.0),
                                    Policy.uniform("gq", bits=4, group=64)])
@pytest.mark.parametrize("cache", ["lru", "lfu", "static-hot"])
@pytest.mark.parametrize("on_miss", ["fetch", "cpu"])
def test_every_policy_kind_and_cache_runs_on_a_cpu_device(policy, cache, on_miss):
    g = make_geometry(num_layers=3, experts=8, top_k=2)
    hw = cpu_hardware(**{"gpu.decode.gq": {"levels": [1.0], "gbps": [0.5], "source": "measured"},
                         "host.disk_curve": CURVE})
    sv = serving_with_cache(g, 3 * MB, generated_tokens=20, cache_policy=cache, on_miss=on_miss,
                            host_mem_bytes=4 * MB)
    wl = make_workload(g, sv, synthetic=SyntheticSpec(1.0, 0.2, 1))
    r = simulate_policy(geometry=g, hardware=hw, serving=sv, policy=policy, workload=wl,
                        ratios=SyntheticRatios()).result
    assert r.tokens_per_s > 0 and r.misses > 0
    cf = ClosedFormModel(hw, g, sv, wl)
    costs = build_costs(g, policy, hw, sv, SyntheticRatios())
    assert cf.tokens_per_s_costs(costs) > 0


def test_a_profile_without_a_needed_figure_is_refused_in_one_line():
    g = make_geometry()
    sv = serving_with_cache(g, MB, generated_tokens=2)
    hw = cpu_hardware()
    with pytest.raises(ConfigError, match=r"no device \(CPU\) decode speed for codec 'ans' "
                                          r"\(gpu.decode.ans\).*moesz profile hardware"):
        build_costs(g, Policy.uniform("ans", "meanabs", 1.0), hw, sv, SyntheticRatios())
    with pytest.raises(ConfigError, match="no CPU decode speed for codec 'lossless'"):
        build_costs(g, Policy.uniform("lossless"), hw, sv, SyntheticRatios())


def test_host_decode_on_the_cpu_device_holds_the_model_thread_for_its_share_of_the_lock():
    """sz3's measured 1.25x at two threads gives a 60 % share of Python's lock (2 / 1.25 - 1).
    Two host-codec misses a step, 1 ms of decode each alone: the workers run the 40 % that does
    not hold the lock at once (0.4 ms) and copy the experts (1.5 ms), then the model's thread
    runs each decode's held 0.6 ms in turn before computing the experts:
    1.9 + 0.6 + 0.6 + 0.25 + 0.25 = 3.6 ms a step."""
    g = make_geometry()
    threads = {"threads": [1, 2], "speedup": [1.0, 1.25], "source": "measured"}
    hw = cpu_hardware(**{"host.codecs.sz3.threads": threads})
    sv = serving_with_cache(g, 0, generated_tokens=4)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB, stored_bytes=MB // 2,
                          cpu_decode_s=0.001)
    r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert r.decode_s == pytest.approx(4 * 0.0036, rel=1e-9)
    assert any("lock 60%" in lab for lab in r.labels)
    cf = ClosedFormModel(hw, g, sv, wl).tokens_per_s_costs(costs)
    assert cf == pytest.approx(r.tokens_per_s, rel=0.10)


@pytest.mark.parametrize("capacity", [1, 2])
def test_a_server_is_active_while_queued_jobs_run_back_to_back(capacity):
    """The disk's busy fraction is the union of its read spans: three 1 s reads submitted at
    once keep a one-at-a-time disk active 3 s (not the last read's second alone), two at a time
    2 s."""
    import simpy

    from sim.servers import DEMAND, Server

    env = simpy.Environment()
    ssd = Server(env, "SSD read", capacity)
    for i in range(3):
        ssd.submit(i, 1.0, DEMAND, lambda _: None)
    env.run()
    span = 3.0 if capacity == 1 else 2.0
    assert env.now == pytest.approx(span)
    assert ssd.active_fraction(env.now) == pytest.approx(1.0)


def test_disk_busy_fraction_of_the_golden_one_read_at_a_time_case():
    """Depth 1, two 2 ms reads a step back to back: the disk is busy 4 ms of each 4.85 ms step."""
    g = make_geometry()
    hw = make_hardware(**{"host.disk_curve": CURVE, "gpu.h2d_pinned.gbps": 10.0})
    sv = serving_with_cache(g, 0, generated_tokens=4, host_mem_bytes=1, disk_depth=1)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert r.disk_busy_fraction * r.time_s == pytest.approx(
        (r.time_s / (0.002 + 0.002 + 0.0006 + C_S)) * 0.004, rel=1e-9)


def test_a_disk_known_only_by_its_one_read_line_serves_one_read_at_a_time():
    """A profile without a depth curve measured the disk one read at a time: asking for more
    reads in flight must not multiply its bandwidth (the simulation's label says "one at a
    time"). 1 ms + 1 MB / 0.5 GB/s = 3 ms per read, two a step: 6 ms of reads, then the copies."""
    g = make_geometry()
    hw = make_hardware(**{"gpu.h2d_pinned.gbps": 10.0})
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    out = {}
    for depth in (1, 4):
        sv = serving_with_cache(g, 0, generated_tokens=4, host_mem_bytes=1, disk_depth=depth)
        wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
        r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
        cf = ClosedFormModel(hw, g, sv, wl).tokens_per_s_costs(costs)
        out[depth] = (r.decode_s, r.disk_depth, cf)
        assert any("one at a time" in lab for lab in r.labels)
    assert out[4][0] == pytest.approx(out[1][0], rel=1e-9)
    assert out[4][1] == 1
    assert out[4][2] == pytest.approx(out[1][2], rel=1e-9)


def test_an_expert_run_on_the_cpu_of_a_cpu_device_waits_for_the_model_thread():
    """on_miss cpu on the CPU device: the runtime runs a missed expert in the model's thread, one
    after the hit's compute, not beside it. Expert 0 pinned (static-hot), one other missed a
    step: 0.25 ms compute of the hit + 2 ms CPU run of the miss = 2.25 ms a step (a GPU
    overlaps them: 2 ms)."""
    g = make_geometry()
    steps = [[(0, 1 + t % 3)] for t in range(6)]
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    out = {}
    for name, hw in (("cpu", cpu_hardware()), ("gpu", make_hardware())):
        sv = serving_with_cache(g, MB, generated_tokens=6, cache_policy="static-hot",
                                on_miss="cpu")
        wl = make_workload(g, sv, traces=trace_df(steps))
        r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
        assert (r.hits, r.cpu_expert_runs) == (6, 6)
        out[name] = r.decode_s
        cf = ClosedFormModel(hw, g, sv, wl).tokens_per_s_costs(costs)
        assert cf == pytest.approx(r.tokens_per_s, rel=1e-9), name
    assert out["gpu"] == pytest.approx(6 * 0.002, rel=1e-9)
    assert out["cpu"] == pytest.approx(6 * (0.002 + C_S), rel=1e-9)


# the runtime's own work the CPU device's calibration measures (profiles.runtime.calibrate)
BY_BATCH = [{"batch": 1, "expert_ffn": {"tokens": [1], "seconds": [0.0004], "source": "measured"},
             "miss_overhead_s": 0.0002},
            {"batch": 4, "expert_ffn": {"tokens": [1], "seconds": [0.0001], "source": "measured"},
             "miss_overhead_s": 0.0}]


def test_expert_time_and_per_miss_work_are_read_at_the_serving_batch():
    """Batch 1 reads its own row (0.4 ms compute, 0.2 ms per miss), batch 2 a third of the way
    to batch 4's, batch 8 batch 4's (no extrapolation), no batch the first calibrated one (as
    its per-miss work): two misses a step at batch 1 cost
    2 x (copy 1.5 + 0.2 + 0.4) = 4.2 ms."""
    from profiles.hardware.schema import ModelTimings

    hw = cpu_hardware(**{"model_timings.0.by_batch": BY_BATCH})
    mt: ModelTimings = hw.model_timings[0]
    assert mt.expert_s(1, 1) == pytest.approx(0.0004) and mt.expert_s(1, 8) == pytest.approx(0.0001)
    assert mt.expert_s(1, 2) == pytest.approx(0.0003) and mt.expert_s(1) == 0.0004
    assert mt.miss_overhead_s(2) == pytest.approx(0.0002 * 2 / 3) and mt.miss_overhead_s(9) == 0.0
    g = make_geometry()
    sv = serving_with_cache(g, 0, generated_tokens=5)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(5)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert r.decode_s == pytest.approx(5 * 2 * (L_S + 0.0002 + 0.0004), rel=1e-12)
    assert any("per fetched expert" in lab for lab in r.labels)
    assert ClosedFormModel(hw, g, sv, wl).tokens_per_s_costs(costs) == pytest.approx(
        r.tokens_per_s, rel=1e-9)
    # a GPU profile's copies overlap the model: the CPU device's per-miss work is not charged
    gpu = make_hardware(**{"model_timings.0.by_batch": BY_BATCH})
    assert simulate(geometry=g, hardware=gpu, serving=sv, costs=costs,
                    workload=wl).result.decode_s == pytest.approx(5 * (2 * L_S + 0.0004))


def test_a_disk_read_costs_the_model_thread_its_calibrated_handoff():
    """0.3 ms per record read, in the model's thread after the read: the depth-1 golden case
    (read0 0-2, copy0 2-2.6; read1 2-4, copy1 4-4.6, compute 4.6-4.85) plus 0.3 ms per read
    (the second read, beside the first copy and handoff, still ends at 4 ms)."""
    g = make_geometry()
    hw = cpu_hardware(**{"host.disk_curve": CURVE, "gpu.h2d_pinned.gbps": 10.0,
                         "model_timings.0.disk_read_overhead_s": 0.0003})
    sv = serving_with_cache(g, 0, generated_tokens=4, host_mem_bytes=1, disk_depth=1)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB)
    r = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    assert r.decode_s == pytest.approx(4 * (0.004 + 0.0003 + 0.0006 + C_S), rel=1e-9)
    assert any("per record read from disk" in lab for lab in r.labels)


@pytest.mark.parametrize("field", ["host_miss_overhead_s", "decode_miss_overhead_s",
                                   "disk_read_overhead_s"])
@pytest.mark.parametrize("policy", [Policy.uniform("szp", "meanabs", 1.0),
                                    Policy.uniform("sz3", "meanabs", 1.0), Policy.none()])
def test_closed_form_and_simulation_agree_with_each_calibrated_overhead(field, policy):
    """Each overhead slows both alike where it applies (host-codec misses, misses decoded on the
    device, disk reads), and neither where it does not."""
    g = make_geometry(num_layers=4, experts=16, top_k=2)
    threads = {"threads": [1, 2], "speedup": [1.0, 1.25], "source": "measured"}
    hw0 = cpu_hardware(**{"host.disk_curve": CURVE, "host.codecs.sz3.threads": threads,
                          "host.codecs.sz3.decode.gbps": [0.5], "gpu.decode.szp.gbps": [0.5],
                          "model_timings.0.by_batch": BY_BATCH})
    hw = cpu_hardware(**{"host.disk_curve": CURVE, "host.codecs.sz3.threads": threads,
                         "host.codecs.sz3.decode.gbps": [0.5], "gpu.decode.szp.gbps": [0.5],
                         "model_timings.0.by_batch": BY_BATCH, f"model_timings.0.{field}": 0.002})
    sv = serving_with_cache(g, 8 * MB, generated_tokens=120, host_mem_bytes=4 * MB)
    wl = make_workload(g, sv, synthetic=SyntheticSpec(0.0, 0.0, 3))
    costs = build_costs(g, policy, hw, sv, SyntheticRatios())
    sim = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    cf = ClosedFormModel(hw, g, sv, wl).tokens_per_s_costs(costs)
    assert cf == pytest.approx(sim.tokens_per_s, rel=0.10)
    base = simulate(geometry=g, hardware=hw0, serving=sv, costs=costs, workload=wl).result
    applies = {"host_miss_overhead_s": policy.spec_for(0, 0).codec == "sz3",
               "decode_miss_overhead_s": policy.spec_for(0, 0).codec == "szp",
               "disk_read_overhead_s": True}[field]
    assert (sim.tokens_per_s < base.tokens_per_s * 0.99) == applies


@pytest.mark.parametrize("overhead", [0.0, 1e-12, 0.0003])
def test_a_host_codec_record_from_disk_goes_from_the_reader_to_a_worker(overhead):
    """As the runtime hands a host-codec record read from disk straight to a worker, the
    simulation books the read's handoff in the model's thread after the worker's part, not
    before it: the simulation and the closed form agree exactly on a golden case (two `sz3`
    misses a step, read one at a time), and a vanishing handoff changes nothing."""
    g = make_geometry()
    threads = {"threads": [1, 2], "speedup": [1.0, 1.25], "source": "measured"}
    hw = cpu_hardware(**{"host.disk_curve": CURVE, "host.codecs.sz3.threads": threads,
                         "model_timings.0.disk_read_overhead_s": overhead})
    sv = serving_with_cache(g, 0, generated_tokens=4, host_mem_bytes=1, disk_depth=1)
    wl = make_workload(g, sv, traces=trace_df(distinct_steps(4)))
    costs = uniform_costs(g.moe_layers, 4, original_bytes=MB, stored_bytes=MB // 2,
                          cpu_decode_s=0.001)
    sim = simulate(geometry=g, hardware=hw, serving=sv, costs=costs, workload=wl).result
    cf = ClosedFormModel(hw, g, sv, wl).tokens_per_s_costs(costs)
    assert cf == pytest.approx(sim.tokens_per_s, rel=1e-9)
    none = cpu_hardware(**{"host.disk_curve": CURVE, "host.codecs.sz3.threads": threads})
    plain = simulate(geometry=g, hardware=none, serving=sv, costs=costs, workload=wl).result
    assert (sim.decode_s == pytest.approx(plain.decode_s, rel=1e-9)) == (overhead < 1e-9)
