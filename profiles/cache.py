"""Expert-cache policies shared by the simulator and the real offloaded runtime.

A cache holds experts keyed by `(layer, expert)` within a byte capacity. The caller asks
`access(key)` when an expert is needed (True = hit; the policy updates its bookkeeping) and
`insert(key, nbytes)` when a missed expert has arrived; `insert` returns the keys it evicted. A
policy may refuse to admit a key (`static-hot` admits only its pinned set); the caller then uses
the expert from a staging buffer and drops it.

Policies: `lru` (mixtral-offloading's per-layer LRU, generalised to bytes), `lfu` (perfect LFU:
counts survive eviction, ties broken by recency), `static-hot` (pin the most activated experts,
as Fiddler and llama.cpp's `--n-cpu-moe` place experts statically). `PerLayerCache` gives every
layer its own cache and capacity (AdapMoE-style per-layer allocation).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Hashable, Iterable, Mapping, Sequence

from profiles.errors import ConfigError

Key = Hashable


class ExpertCache:
    """Base class: bookkeeping of resident keys and bytes, hit and miss counters."""

    name = "base"

    def __init__(self, capacity_bytes: float) -> None:
        if capacity_bytes is None or capacity_bytes < 0:
            raise ConfigError(f"expert cache: capacity {capacity_bytes!r} bytes is invalid; "
                              f"expected >= 0 (use float('inf') for unlimited)")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._size: dict[Key, int] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._size

    def __len__(self) -> int:
        return len(self._size)

    def keys(self) -> list[Key]:
        return list(self._size)

    def nbytes(self, key: Key) -> int:
        return self._size[key]

    def access(self, key: Key) -> bool:
        """Record a use of `key`; return True if it is resident (a hit)."""
        hit = key in self._size
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        self._touch(key, hit)
        return hit

    def admits(self, key: Key, nbytes: int) -> bool:
        """Whether `insert(key, nbytes)` would keep the key (it fits the capacity at all)."""
        return nbytes <= self.capacity_bytes

    def insert(self, key: Key, nbytes: int) -> list[Key]:
        """Make `key` resident (evicting as needed); return the evicted keys.

        A key that is already resident, or that the policy does not admit, changes nothing.
        """
        if key in self._size or not self.admits(key, nbytes):
            return []
        evicted = (self._evict_until(self.capacity_bytes - nbytes)
                   if self.used_bytes + nbytes > self.capacity_bytes else [])
        self._size[key] = int(nbytes)
        self.used_bytes += int(nbytes)
        self._added(key)
        return evicted

    def remove(self, key: Key) -> None:
        nbytes = self._size.pop(key)
        self.used_bytes -= nbytes
        self._removed(key)

    def resize(self, capacity_bytes: float) -> list[Key]:
        """Change the capacity (for example as the KV cache grows); return the evicted keys."""
        if capacity_bytes < 0:
            raise ConfigError(f"expert cache: capacity {capacity_bytes!r} bytes is negative")
        self.capacity_bytes = capacity_bytes
        return self._evict_until(capacity_bytes)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    # Policy hooks.
    def _touch(self, key: Key, hit: bool) -> None:
        pass

    def _added(self, key: Key) -> None:
        pass

    def _removed(self, key: Key) -> None:
        pass

    def _victim(self) -> Key:
        raise NotImplementedError

    def _evict_until(self, limit: float) -> list[Key]:
        evicted = []
        while self.used_bytes > limit and self._size:
            key = self._victim()
            self.remove(key)
            evicted.append(key)
        return evicted


class LRUCache(ExpertCache):
    """Least recently used; a hit moves the key to the most-recent end."""

    name = "lru"

    def __init__(self, capacity_bytes: float) -> None:
        super().__init__(capacity_bytes)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def _touch(self, key: Key, hit: bool) -> None:
        if hit:
            self._order.move_to_end(key)

    def _added(self, key: Key) -> None:
        self._order[key] = None

    def _removed(self, key: Key) -> None:
        del self._order[key]

    def _victim(self) -> Key:
        return next(iter(self._order))

    def insert(self, key: Key, nbytes: int) -> list[Key]:
        # Same contract as ExpertCache.insert, without the hooks (the simulator's hot path).
        size = self._size
        if key in size or nbytes > self.capacity_bytes:
            return []
        evicted = []
        limit = self.capacity_bytes - nbytes
        order = self._order
        while self.used_bytes > limit:
            victim, _ = order.popitem(last=False)
            self.used_bytes -= size.pop(victim)
            evicted.append(victim)
        size[key] = int(nbytes)
        order[key] = None
        self.used_bytes += int(nbytes)
        return evicted


class LFUCache(ExpertCache):
    """Least frequently used (perfect LFU): use counts persist after eviction; ties go to LRU."""

    name = "lfu"

    def __init__(self, capacity_bytes: float) -> None:
        super().__init__(capacity_bytes)
        self._count: dict[Key, int] = {}
        self._stamp: dict[Key, int] = {}
        self._tick = 0
        self._heap: list[tuple[int, int, int, Key]] = []  # (count, stamp, seq, key); lazy entries
        self._seq = 0

    def _touch(self, key: Key, hit: bool) -> None:
        self._tick += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._stamp[key] = self._tick
        if hit:
            self._push(key)

    def _added(self, key: Key) -> None:
        if key not in self._count:
            self._tick += 1
            self._count[key] = 1
            self._stamp[key] = self._tick
        self._push(key)

    def _push(self, key: Key) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (self._count[key], self._stamp[key], self._seq, key))
        if len(self._heap) > 8 * len(self._size) + 64:  # drop stale lazy entries
            self._heap = [(self._count[k], self._stamp[k], i, k) for i, k in enumerate(self._size)]
            heapq.heapify(self._heap)

    def _victim(self) -> Key:
        while True:
            count, stamp, _, key = heapq.heappop(self._heap)
            if key in self._size and self._count[key] == count and self._stamp[key] == stamp:
                return key


class StaticHotCache(ExpertCache):
    """Pin a fixed set of hot experts; admit nothing else.

    Args:
        capacity_bytes: byte capacity.
        hot: keys in priority order (most activated first), with their sizes in bytes. The pinned
            set is the longest prefix that fits the capacity.
    """

    name = "static-hot"

    def __init__(self, capacity_bytes: float, hot: Sequence[tuple[Key, int]] = ()) -> None:
        super().__init__(capacity_bytes)
        self.pinned: list[tuple[Key, int]] = []
        total = 0
        for key, nbytes in hot:
            if total + nbytes > capacity_bytes:
                break
            total += nbytes
            self.pinned.append((key, int(nbytes)))
        self._pinned_keys = {k for k, _ in self.pinned}
        self._rank = {k: i for i, (k, _) in enumerate(self.pinned)}

    def admits(self, key: Key, nbytes: int) -> bool:
        return key in self._pinned_keys and nbytes <= self.capacity_bytes

    def preload(self) -> list[tuple[Key, int]]:
        """Make every pinned expert resident (startup); return what was loaded."""
        for key, nbytes in self.pinned:
            self.insert(key, nbytes)
        return list(self.pinned)

    def _victim(self) -> Key:
        # Shrinking drops the least important pinned expert first.
        return max(self._size, key=self._rank.__getitem__)


CACHE_POLICIES: dict[str, type[ExpertCache]] = {
    LRUCache.name: LRUCache,
    LFUCache.name: LFUCache,
    StaticHotCache.name: StaticHotCache,
}


def make_cache(policy: str, capacity_bytes: float,
               hot: Sequence[tuple[Key, int]] = ()) -> ExpertCache:
    """Build a cache by policy name; `hot` (key, bytes) in priority order is for `static-hot`."""
    if policy not in CACHE_POLICIES:
        raise ConfigError(f"cache policy {policy!r} is unknown; choose one of "
                          f"{', '.join(CACHE_POLICIES)}")
    if policy == StaticHotCache.name:
        return StaticHotCache(capacity_bytes, hot)
    return CACHE_POLICIES[policy](capacity_bytes)


class PerLayerCache(ExpertCache):
    """One cache per layer, each with its own capacity; keys are `(layer, expert)`.

    Args:
        policy: policy name for every layer.
        capacity_by_layer: layer -> byte capacity. A layer not listed has capacity 0.
        hot: (key, bytes) in priority order, for `static-hot` (split by layer).
    """

    name = "per-layer"

    def __init__(self, policy: str, capacity_by_layer: Mapping[int, float],
                 hot: Iterable[tuple[Key, int]] = ()) -> None:
        super().__init__(float(sum(capacity_by_layer.values())))
        self.policy = policy
        hot_by_layer: dict[int, list[tuple[Key, int]]] = {}
        for key, nbytes in hot:
            hot_by_layer.setdefault(key[0], []).append((key, nbytes))
        self.layers: dict[int, ExpertCache] = {
            layer: make_cache(policy, cap, hot_by_layer.get(layer, ()))
            for layer, cap in capacity_by_layer.items()}
        self._empty = make_cache(policy, 0)

    def _layer(self, key: Key) -> ExpertCache:
        return self.layers.get(key[0], self._empty)

    def __contains__(self, key: Key) -> bool:
        return key in self._layer(key)

    def __len__(self) -> int:
        return sum(len(c) for c in self.layers.values())

    def keys(self) -> list[Key]:
        return [k for c in self.layers.values() for k in c.keys()]

    def nbytes(self, key: Key) -> int:
        return self._layer(key).nbytes(key)

    def access(self, key: Key) -> bool:
        hit = self._layer(key).access(key)
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        return hit

    def admits(self, key: Key, nbytes: int) -> bool:
        return self._layer(key).admits(key, nbytes)

    def insert(self, key: Key, nbytes: int) -> list[Key]:
        cache = self._layer(key)
        before = cache.used_bytes
        evicted = cache.insert(key, nbytes)
        self.used_bytes += cache.used_bytes - before
        return evicted

    def remove(self, key: Key) -> None:
        cache = self._layer(key)
        before = cache.used_bytes
        cache.remove(key)
        self.used_bytes += cache.used_bytes - before

    def resize(self, capacity_bytes: float) -> list[Key]:
        """Scale every layer's capacity by the same factor."""
        old = self.capacity_bytes
        scale = capacity_bytes / old if old else 0.0
        evicted = []
        for cache in self.layers.values():
            evicted += cache.resize(cache.capacity_bytes * scale)
        self.capacity_bytes = capacity_bytes
        self.used_bytes = sum(c.used_bytes for c in self.layers.values())
        return evicted

    def preload(self) -> list[tuple[Key, int]]:
        loaded = []
        for cache in self.layers.values():
            if isinstance(cache, StaticHotCache):
                loaded += cache.preload()
        self.used_bytes = sum(c.used_bytes for c in self.layers.values())
        return loaded
