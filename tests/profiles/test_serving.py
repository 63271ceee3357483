"""ServingConfig and memory budgets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from profiles.errors import ConfigError
from profiles.serving import MemBudget, ServingConfig, format_bytes, parse_mem, parse_prefetch


@pytest.mark.parametrize("text,expect", [
    ("24GiB", MemBudget(bytes=24 * 2**30)),
    ("80GB", MemBudget(bytes=80 * 10**9)),
    ("512 MiB", MemBudget(bytes=512 * 2**20)),
    ("1.5TiB", MemBudget(bytes=int(1.5 * 2**40))),
    ("1e9", MemBudget(bytes=10**9)),
    (4096, MemBudget(bytes=4096)),
    ("25%", MemBudget(fraction=0.25)),
    ("0.5x", MemBudget(fraction=0.5)),
    ("0%", MemBudget(fraction=0.0)),
    ("unlimited", MemBudget()),
    (None, MemBudget()),
])
def test_parse_mem(text, expect):
    assert parse_mem(text) == expect


@pytest.mark.parametrize("text,match", [
    ("-1GiB", "negative"), ("lots", "cannot read"), ("5XB", "unknown unit"),
    ("150%", "more than 100"), (-3, "negative"), (True, "not a size"),
])
def test_parse_mem_errors_name_the_option(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_mem(text, what="--gpu-mem")
    assert str(info.value).startswith("--gpu-mem") and "\n" not in str(info.value)


@given(st.integers(min_value=0, max_value=2**50))
def test_parse_mem_bytes_round_trip(n):
    assert parse_mem(f"{n}B").bytes == n
    assert parse_mem(n).bytes == n


@given(st.floats(min_value=0, max_value=100, allow_nan=False))
def test_parse_mem_percent(p):
    assert parse_mem(f"{p!r}%").fraction == pytest.approx(p / 100)


def test_fraction_budgets_follow_the_issue():
    sv = ServingConfig(gpu_mem_fraction=0.25, host_mem_fraction=0.5)
    # GPU: non-expert weights + KV cache + 25 % of the routed experts; host: 50 % of them
    assert sv.resolve_gpu_bytes(non_expert_bytes=100, kv_bytes=20, routed_expert_bytes=1000) == 370
    assert sv.resolve_host_bytes(1000) == 500
    assert ServingConfig().resolve_gpu_bytes(1, 2, 3) is None
    assert ServingConfig(gpu_mem_bytes=7).resolve_gpu_bytes(100, 20, 1000) == 7
    assert str(sv.gpu_budget) == "25%" and str(ServingConfig().host_budget) == "unlimited"


def test_with_budgets_and_round_trip():
    sv = ServingConfig(cache_policy="static-hot", per_layer_cache_slots=(1, 2), prefetch="next:0.8")
    sv2 = sv.with_budgets(parse_mem("24GiB"), parse_mem("25%"))
    assert sv2.gpu_mem_bytes == 24 * 2**30 and sv2.host_mem_fraction == 0.25
    assert ServingConfig.from_dict(sv2.to_dict()) == sv2
    assert sv2.prefetch_mode == ("next", 0.8)


@pytest.mark.parametrize("kw,match", [
    (dict(cache_policy="fifo"), "cache_policy"),
    (dict(batch_size=0), "batch_size"),
    (dict(prefetch="next:1.5"), "prefetch"),
    (dict(gpu_mem_bytes=10, gpu_mem_fraction=0.5), "not both"),
    (dict(host_mem_fraction=1.5), "host_mem_fraction"),
    (dict(gpu_decode_slowdown=0.5), "gpu_decode_slowdown"),
    (dict(per_layer_cache_slots=(1, -1)), "per_layer_cache_slots"),
    (dict(on_miss="disk"), "on_miss"),
])
def test_invalid_serving_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        ServingConfig(**kw)


def test_from_dict_unknown_field():
    with pytest.raises(ConfigError, match="unknown field.*gpu_mem"):
        ServingConfig.from_dict({"gpu_mem": "24GiB"})


def test_prefetch_and_format():
    assert parse_prefetch("none") == ("none", 0.0)
    assert parse_prefetch("oracle") == ("oracle", 1.0)
    assert parse_prefetch("next:0.25") == ("next", 0.25)
    assert format_bytes(24 * 2**30) == "24.0 GiB" and format_bytes(12) == "12 B"
