"""What the runtime learns from routing: next-layer predictions, hot experts, replayable routes.

- `router_lookahead`: the next MoE layer's router applied to the current layer's input — the
  prediction MoE-Infinity and Pre-gated MoE use for prefetching (the residual stream changes
  little from one layer to the next, so the next router's choice on it is usually right).
- `hot_order`: experts by decode activations, most first, ties by position — exactly the order
  the simulator's `Workload.hot_order` gives static-hot, so both pin the same experts.
- `routing_by_step`: the union of experts per step and MoE layer, which `oracle` prefetch replays.

Routing is recorded per forward pass as `(phase, [(top_k_index, top_k_weights) per MoE layer])`,
CPU tensors of shape [tokens, top_k].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Key = tuple[int, int]
Routing = list[tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]]


def router_lookahead(router, h: torch.Tensor, top_k: int) -> set[int]:
    """The experts `router` would pick for the tokens `h` [tokens, hidden] (union of top-k)."""
    weight = getattr(router, "weight", None)
    if weight is None:
        return set()
    bias = getattr(router, "bias", None)
    logits = F.linear(h.to(weight.dtype), weight, bias if isinstance(bias, torch.Tensor) else None)
    corr = getattr(router, "e_score_correction_bias", None)   # DeepSeek-V3's selection bias
    if isinstance(corr, torch.Tensor):
        logits = logits.float().sigmoid() + corr
    top = logits.topk(top_k, dim=-1).indices
    return set(torch.unique(top).tolist())


def decode_counts(routing: Routing, num_layers: int, experts_per_layer: int) -> np.ndarray:
    """[MoE layer position, expert] decode activations, one per step that used the expert."""
    counts = np.zeros((num_layers, experts_per_layer), dtype=np.int64)
    for phase, layers in routing:
        if phase == "decode":
            for li, (idx, _) in enumerate(layers):
                counts[li, torch.unique(idx).numpy()] += 1
    return counts


def hot_order(routing: Routing, moe_layers: tuple[int, ...], experts_per_layer: int) -> list[Key]:
    """(layer, expert) by decode activations, most first; ties by position."""
    counts = decode_counts(routing, len(moe_layers), experts_per_layer)
    flat = np.lexsort((np.arange(counts.size), -counts.ravel()))
    return [(moe_layers[int(i // experts_per_layer)], int(i % experts_per_layer)) for i in flat]


def routing_by_step(routing: Routing) -> list[list[tuple[int, ...]]]:
    """Per step and MoE layer position, the experts used (ascending)."""
    return [[tuple(torch.unique(idx).tolist()) for idx, _ in layers] for _, layers in routing]
