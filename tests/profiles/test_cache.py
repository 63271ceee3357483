"""Expert-cache policies: eviction order, byte accounting, static placement, per-layer caches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.cache import (CACHE_POLICIES, LFUCache, LRUCache, PerLayerCache, StaticHotCache,
                            make_cache)
from profiles.errors import ConfigError


def test_lru_evicts_least_recent_by_bytes():
    c = LRUCache(300)
    for k in "abc":
        assert not c.access(k)
        assert c.insert(k, 100) == []
    assert c.access("a")  # a is now most recent; b is least
    assert c.insert("d", 150) == ["b", "c"]
    assert set(c.keys()) == {"a", "d"} and c.used_bytes == 250
    assert (c.hits, c.misses) == (1, 3)
    assert c.resize(160) == ["a"] and c.keys() == ["d"] and c.used_bytes == 150


def test_lfu_evicts_least_frequent_ties_to_lru():
    c = LFUCache(200)
    for k in "ab":
        c.access(k)
        c.insert(k, 100)
    c.access("a")
    c.access("a")
    assert c.insert("c", 100) == ["b"]
    c.access("c")  # counts: a 3, c 2 (one miss + one hit)
    c.access("d")
    assert c.insert("d", 100) == ["c"]  # d has 1 access; c (2) is least frequent resident
    # counts survive eviction: b was used once before, now twice, beats d (1)
    c.access("b")
    assert c.insert("b", 100) == ["d"]


def test_static_hot_pins_prefix_and_refuses_others():
    c = StaticHotCache(250, hot=[("x", 100), ("y", 100), ("z", 100), ("w", 10)])
    assert [k for k, _ in c.pinned] == ["x", "y"]
    assert c.preload() == [("x", 100), ("y", 100)]
    assert c.access("x") and not c.access("z")
    assert c.insert("z", 100) == [] and "z" not in c
    assert c.resize(150) == ["y"]  # shrinking drops the least important pinned expert


def test_insert_larger_than_capacity_is_not_admitted():
    c = LRUCache(50)
    c.insert("a", 40)
    assert c.insert("big", 60) == [] and "big" not in c and "a" in c


def test_per_layer_cache_keeps_layers_apart():
    c = PerLayerCache("lru", {0: 200, 1: 100})
    for e in range(3):
        c.access((0, e))
        c.insert((0, e), 100)
    c.access((1, 0))
    c.insert((1, 0), 100)
    assert set(c.keys()) == {(0, 1), (0, 2), (1, 0)}
    assert c.used_bytes == 300 and c.capacity_bytes == 300
    assert c.insert((2, 0), 10) == [] and (2, 0) not in c  # a layer without slots
    hot = PerLayerCache("static-hot", {0: 100, 1: 100}, hot=[((1, 3), 100), ((0, 2), 100)])
    assert sorted(k for k, _ in hot.preload()) == [(0, 2), (1, 3)]


def test_registry_and_errors():
    assert set(CACHE_POLICIES) == {"lru", "lfu", "static-hot"}
    assert isinstance(make_cache("lfu", 10), LFUCache)
    with pytest.raises(ConfigError, match="choose one of lru, lfu, static-hot"):
        make_cache("fifo", 10)
    with pytest.raises(ConfigError, match=">= 0"):
        LRUCache(-1)


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["lru", "lfu", "static-hot"]),
       capacity=st.integers(0, 1000),
       ops=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 400)), max_size=80))
def test_bytes_never_exceed_capacity(policy, capacity, ops):
    sizes: dict[int, int] = {}
    for key, size in ops:
        sizes.setdefault(key, size)  # an expert keeps its size
    c = make_cache(policy, capacity, hot=list(sizes.items()))
    if hasattr(c, "preload"):
        c.preload()
    for key, _ in ops:
        size = sizes[key]
        hit = c.access(key)
        assert hit == (key in c)
        if not hit:
            evicted = c.insert(key, size)
            assert all(k not in c for k in evicted)
        assert c.used_bytes <= capacity
        assert c.used_bytes == sum(sizes[k] for k in c.keys())
