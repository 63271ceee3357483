"""Costs of per-matrix policies (issue 17): an expert's stored bytes are the sum of its matrices'
stored bytes, each matrix decodes at its own codec's speed, and an expert with one CPU-decoded
matrix decodes whole on the CPU, as the runtime does. Golden numbers, computable by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from profiles.errors import ConfigError
from profiles.policy import Policy, StorageSpec
from profiles.serving import ServingConfig
from sim.costs import CPU, GPU, build_costs
from sim.ratios import RatioTable
from tests.sim.conftest import MB, make_geometry, make_hardware

# the test geometry: gate_up 32 x 8 = 256 values, down 8 x 16 = 128 values -> shares 2/3 and 1/3;
# bf16 bytes of one expert = 2 * 384 = 768
BF16 = 768.0
RATIOS = RatioTable(pd.DataFrame({"layer": [0, 0], "codec": ["szp", "sz3"],
                                  "mode": ["meanabs", "meanabs"], "level": [1.0, 1.0],
                                  "ratio": [4.0, 2.0]}), "test ratios")
SZP, SZ3 = StorageSpec.parse("szp:meanabs:1"), StorageSpec.parse("sz3:meanabs:1")
SERVING = ServingConfig(gpu_mem_fraction=0.5)


def test_gpu_matrix_and_raw_matrix():
    policy = Policy(default=SZP, matrices={(None, None, "down"): StorageSpec()})
    c = build_costs(make_geometry(), policy, make_hardware(), SERVING, RATIOS)
    # stored: gate_up MB * 2/3 / 4 = 166,667 (rounded) + down raw MB / 3 = 333,333
    assert c.stored_bytes[0, 0] == 166_667 + 333_333
    assert c.decode_where[0, 0] == GPU
    assert c.link_bytes[0, 0] == 500_000
    # only gate_up decodes: 512 bf16 bytes at 0.00128 GB/s
    assert c.gpu_decode_s[0, 0] == pytest.approx(BF16 * 2 / 3 / 1.28e6)
    uniform = build_costs(make_geometry(), Policy(default=SZP), make_hardware(), SERVING, RATIOS)
    assert uniform.stored_bytes[0, 0] == 250_000
    assert uniform.gpu_decode_s[0, 0] == pytest.approx(BF16 / 1.28e6)


def test_a_cpu_matrix_makes_the_expert_decode_on_the_cpu():
    policy = Policy(default=SZP, matrices={(None, None, "down"): SZ3})
    hw = make_hardware(**{"host.codecs.szp": {"decode": {"levels": [1.0], "gbps": [0.002],
                                                         "source": "estimated"}}})
    c = build_costs(make_geometry(), policy, hw, SERVING, RATIOS)
    assert c.stored_bytes[0, 0] == 166_667 + 166_667
    assert c.decode_where[0, 0] == CPU
    assert c.link_bytes[0, 0] == MB          # the decoded expert crosses the link
    # gate_up szp on the CPU at 0.002 GB/s + down sz3 at 0.001 GB/s
    assert c.cpu_decode_s[0, 0] == pytest.approx(512 / 2e6 + 256 / 1e6)
    assert c.gpu_decode_s[0, 0] == 0.0


def test_a_gpu_codec_without_a_cpu_speed_beside_a_cpu_matrix_is_refused():
    policy = Policy(default=SZP, matrices={(None, None, "down"): SZ3})
    with pytest.raises(ConfigError, match="no CPU decode speed for codec 'szp'.*another matrix "
                                          "of the same expert decodes on the CPU"):
        build_costs(make_geometry(), policy, make_hardware(), SERVING, RATIOS)


def test_gate_and_up_stored_apart_each_cost_half_of_gate_up():
    # a fused gate_up (2/3 of the values) split in halves: gate raw MB / 3 = 333,333, up szp
    # MB / 3 / 4 = 83,333, down szp MB / 3 / 4 = 83,333
    policy = Policy(default=SZP, matrices={(None, None, "gate"): StorageSpec()})
    c = build_costs(make_geometry(), policy, make_hardware(), SERVING, RATIOS)   # a mixtral
    assert c.stored_bytes[0, 0] == 333_333 + 83_333 + 83_333
    assert c.decode_where[0, 0] == GPU
    # up and down decode: 2/3 of the expert's 768 bf16 bytes at 0.00128 GB/s
    assert c.gpu_decode_s[0, 0] == pytest.approx(BF16 * 2 / 3 / 1.28e6)
