"""Sizes the simulator derives from a `profiles.models.geometry.ModelGeometry`.

Only the documented geometry fields are read (duck typing), so any object with them works:
`num_layers`, `moe_layers`, `experts_per_layer`, `top_k`, `hidden_size`,
`expert_intermediate_size`, `dtype`, `bytes_per_expert`, `expert_tensor_shapes`,
`non_expert_bytes`, `num_attention_heads`, `num_key_value_heads`, `head_dim`, `vocab_size`.
"""

from __future__ import annotations

import math
from typing import Any

from profiles.errors import ModelError
from profiles.serving import KV_DTYPE_BYTES, kv_bytes_per_token  # noqa: F401  (shared with the runtime)

# bytes per stored value; mxfp4 = 4 bits + one 8-bit scale per 32 values
DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8_e4m3": 1.0, "mxfp4": 4.25 / 8}


def dtype_bytes(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise ModelError(f"model dtype {dtype!r} is unknown to the simulator; expected one of "
                         f"{', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def expert_params(g: Any) -> int:
    """Parameters of one routed expert, from its tensor shapes (3 * H * I when absent)."""
    shapes = getattr(g, "expert_tensor_shapes", None) or ()
    total = sum(math.prod(shape) for _, shape in shapes)
    return int(total) if total else 3 * g.hidden_size * g.expert_intermediate_size


def routed_expert_bytes(g: Any) -> int:
    """Uncompressed bytes of every routed expert of the model."""
    return int(len(g.moe_layers) * g.experts_per_layer * g.bytes_per_expert)


def non_expert_bytes_per_layer(g: Any) -> float:
    """Non-expert weight bytes read per decoder layer (attention, router, shared and dense MLPs):
    the model's non-expert bytes less the embedding and LM head, spread evenly over the layers."""
    embed = 2 * g.vocab_size * g.hidden_size * dtype_bytes(g.dtype)
    return max(0.0, (g.non_expert_bytes - embed) / g.num_layers)


def check_geometry(g: Any) -> None:
    """Raise `ModelError` if the geometry cannot be simulated (no MoE layer, zero sizes)."""
    name = getattr(g, "name", "model")
    if not tuple(g.moe_layers):
        raise ModelError(f"{name}: the geometry has no MoE layers; the simulator needs routed experts")
    if g.experts_per_layer <= 0 or g.top_k <= 0 or g.top_k > g.experts_per_layer:
        raise ModelError(f"{name}: experts_per_layer={g.experts_per_layer}, top_k={g.top_k}; expected "
                         f"1 <= top_k <= experts_per_layer")
    if g.bytes_per_expert <= 0:
        raise ModelError(f"{name}: bytes_per_expert is {g.bytes_per_expert}; expected > 0")
    if any(not 0 <= layer < g.num_layers for layer in g.moe_layers):
        raise ModelError(f"{name}: moe_layers {tuple(g.moe_layers)} fall outside 0..{g.num_layers - 1}")
    dtype_bytes(g.dtype)
