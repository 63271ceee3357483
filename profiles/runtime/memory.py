"""The device memory budget as the runtime applies it: what is left for the expert cache.

The fixed parts come from `profiles.serving.split_gpu_budget`, which the simulator
(`sim/memory.py`) calls too, so that the same `ServingConfig` gives the same cache in both: the GPU budget (bytes, or the non-expert weights + KV cache + a fraction of
the routed-expert bytes) must hold the non-expert weights, the KV cache for the full context
(batch x (prompt + generated) tokens, bf16, reserved up front) and `staging_slots` decompressed
expert buffers; the rest is the expert cache. With per-layer slots, each MoE layer gets slots x
its largest resident expert. `tests/profiles/test_runtime.py` checks the two stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from profiles.errors import ConfigError
from profiles.serving import ServingConfig, format_bytes, split_gpu_budget


@dataclass(frozen=True)
class DeviceBudget:
    """The budget resolved for one model; `cache_capacity_bytes` is inf when unlimited."""

    gpu_budget_bytes: int | None
    non_expert_bytes: int
    kv_bytes: int
    staging_bytes: int
    cache_capacity_bytes: float
    layer_capacity_bytes: dict[int, float] | None


def device_budget(geometry: Any, serving: ServingConfig,
                  resident_bytes: dict[tuple[int, int], int]) -> DeviceBudget:
    """Resolve `serving`'s GPU budget for this model.

    Args:
        geometry: the model's `ModelGeometry`.
        serving: budgets, workload shape and staging slots.
        resident_bytes: (layer, expert) -> bytes the expert occupies in the cache.

    Raises:
        ConfigError: the budget cannot hold the non-expert weights, KV cache and staging buffers,
            or per-layer slots do not fit the cache.
    """
    split = split_gpu_budget(geometry, serving, int(geometry.bytes_per_expert))
    budget, non_expert, kv = split.budget_bytes, split.non_expert_bytes, split.kv_cache_bytes
    staging, cap = split.staging_bytes, split.cache_capacity_bytes
    layer_caps = None
    if serving.per_layer_cache_slots is not None:
        slots = serving.per_layer_cache_slots
        if len(slots) != len(geometry.moe_layers):
            raise ConfigError(f"per_layer_cache_slots has {len(slots)} entries; the model has "
                              f"{len(geometry.moe_layers)} MoE layers")
        layer_caps = {}
        for layer, n in zip(geometry.moe_layers, slots):
            sizes = [b for (lay, _), b in resident_bytes.items() if lay == layer]
            layer_caps[layer] = float(n * max(sizes, default=0))
        if sum(layer_caps.values()) > cap:
            need = format_bytes(sum(layer_caps.values()))
            raise ConfigError(f"per-layer cache slots need {need} but the GPU budget leaves "
                              f"{format_bytes(cap)} for the expert cache; "
                              f"use fewer slots")
    return DeviceBudget(budget, non_expert, int(kv), staging, cap, layer_caps)
