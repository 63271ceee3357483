"""Small inputs for the planner tests: a tiny MoE geometry and a synthetic profile of it."""

from __future__ import annotations

from pathlib import Path

from profiles.models import ModelGeometry

HIDDEN, INTER = 1024, 512


def tiny_geometry(layers: int = 4, experts: int = 8, top_k: int = 2) -> ModelGeometry:
    """Four MoE layers of 8 bf16 experts of 3 MiB (gate_up 1024x1024, down 1024x512)."""
    params = 2 * INTER * HIDDEN + HIDDEN * INTER
    return ModelGeometry(
        name="tiny-test", architecture="mixtral", num_layers=layers,
        moe_layers=tuple(range(layers)), experts_per_layer=experts, top_k=top_k,
        hidden_size=HIDDEN, expert_intermediate_size=INTER, dtype="bf16",
        bytes_per_expert=2 * params,
        expert_tensor_shapes=(("gate_up_proj", (2 * INTER, HIDDEN)),
                              ("down_proj", (HIDDEN, INTER))),
        shared_expert_bytes=0, non_expert_bytes=4 * 2**20, num_attention_heads=8,
        num_key_value_heads=8, head_dim=128, vocab_size=256)


def tiny_profile(directory: Path, *, seed: int = 0, layers: int = 4,
                 levels=(0.1, 0.3, 1.0), middle_drop: float = 0.02) -> Path:
    """A synthetic model profile of `tiny_geometry` written into `directory`."""
    from planner.synthetic import write_synthetic_profile

    return write_synthetic_profile(
        tiny_geometry(layers), directory, codecs=("szp",), levels=levels, tasks=("a", "b"),
        prompts_per_task=2000, middle_drop=middle_drop, trace_prompts=2, trace_prompt_tokens=4,
        trace_decode_tokens=32, seed=seed, max_values=4096)
