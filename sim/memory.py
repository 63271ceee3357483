"""GPU and host memory layout: what the budgets leave for the expert cache and which experts
live in host memory rather than on SSD. Shared by the simulator and the closed-form model.

GPU: the budget must hold the non-expert weights, the KV cache for the full context
(batch * (prompt + generated) tokens, reserved up front as serving engines do) and
`staging_slots` decompressed expert buffers for misses; the rest is the expert cache.
Host: with a host budget below the stored experts, the simulation keeps an LRU of that many
stored bytes (as the runtime's disk tier does) and reads the others from SSD; `in_host`, the
hottest experts (decode activations in the traces) while their stored bytes fit the budget, is
the closed form's placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from profiles.errors import ConfigError
from profiles.serving import ServingConfig, format_bytes, split_gpu_budget
from sim.costs import ExpertCosts
from sim.shape import routed_expert_bytes


@dataclass(frozen=True)
class MemoryLayout:
    gpu_budget_bytes: int | None
    non_expert_bytes: int
    kv_bytes: int
    staging_bytes: int
    cache_capacity_bytes: float  # inf when the GPU budget is unlimited
    layer_capacity_bytes: tuple[float, ...] | None  # per MoE layer, with per_layer_cache_slots
    host_budget_bytes: int | None
    in_host: np.ndarray  # bool [moe layer, expert]
    host_used_bytes: int
    notes: tuple[str, ...] = ()


def memory_layout(geometry: Any, serving: ServingConfig, costs: ExpertCosts,
                  hot_order: list[tuple[int, int]], gpu_memory_bytes: float | None = None
                  ) -> MemoryLayout:
    """Resolve the budgets of `serving` for this model.

    Args:
        geometry: the model geometry.
        serving: budgets, batch, prompt and generated tokens, staging slots.
        costs: per-expert stored and resident bytes.
        hot_order: (layer position, expert), most activated first.
        gpu_memory_bytes: the device's memory, to warn when the budget exceeds it.

    Raises:
        ConfigError: the GPU budget cannot hold the non-expert weights, KV cache and staging
            buffers, or per-layer slots exceed the cache.
    """
    notes = []
    split = split_gpu_budget(geometry, serving, int(costs.original_bytes))
    budget, non_expert, kv = split.budget_bytes, split.non_expert_bytes, split.kv_cache_bytes
    staging, cap = split.staging_bytes, split.cache_capacity_bytes
    routed = routed_expert_bytes(geometry)
    if budget is not None and gpu_memory_bytes is not None and budget > gpu_memory_bytes:
        notes.append(f"GPU budget {format_bytes(budget)} exceeds the device's "
                     f"{format_bytes(gpu_memory_bytes)}")
    layer_caps = None
    if serving.per_layer_cache_slots is not None:
        slots = serving.per_layer_cache_slots
        L = len(geometry.moe_layers)
        if len(slots) != L:
            raise ConfigError(f"per_layer_cache_slots has {len(slots)} entries; the model has {L} "
                              f"MoE layers")
        layer_caps = tuple(float(s * costs.resident_bytes[li].max()) for li, s in enumerate(slots))
        if sum(layer_caps) > cap:
            raise ConfigError(f"per-layer cache slots need {format_bytes(sum(layer_caps))} but the GPU "
                              f"budget leaves {format_bytes(cap)} for the expert cache; use fewer slots")
    host_budget = serving.resolve_host_bytes(routed)
    stored = costs.stored_bytes
    if host_budget is None or host_budget >= stored.sum():
        in_host = np.ones(stored.shape, dtype=bool)
    else:
        in_host = np.zeros(stored.shape, dtype=bool)
        order = np.array(hot_order, dtype=np.int64).reshape(-1, 2)
        sizes = stored[order[:, 0], order[:, 1]]
        fit = int(np.searchsorted(np.cumsum(sizes), host_budget, side="right"))
        in_host[order[:fit, 0], order[:fit, 1]] = True
        notes.append(f"host budget {format_bytes(host_budget)} holds {fit} of {stored.size} experts "
                     f"({format_bytes(stored.sum())} stored): the simulation keeps an LRU of "
                     f"that many bytes, empty at the start, as the runtime's disk tier does, and "
                     f"reads a record it lacks from SSD; the closed form places the hottest "
                     f"experts in host memory instead")
    return MemoryLayout(budget, non_expert, int(kv), staging, cap, layer_caps, host_budget, in_host,
                        int(stored[in_host].sum()), tuple(notes))
