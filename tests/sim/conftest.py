"""Fixtures for simulator tests: tiny geometries, a hand-made hardware profile with round
numbers (so makespans can be computed by hand), and trace builders."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from profiles.hardware import profile_from_dict
from profiles.models import ModelGeometry

MB = 1_000_000


def make_geometry(num_layers=1, experts=4, top_k=2, bytes_per_expert=MB, moe_layers=None,
                  name="test-geometry"):
    """A ModelGeometry with no non-expert weights and a 1-layer, 1-head, 1-dim KV cache."""
    return ModelGeometry(
        name=name, architecture="mixtral", num_layers=num_layers,
        moe_layers=tuple(range(num_layers)) if moe_layers is None else tuple(moe_layers),
        experts_per_layer=experts, top_k=top_k, hidden_size=8, expert_intermediate_size=16,
        dtype="bf16", bytes_per_expert=bytes_per_expert,
        expert_tensor_shapes=(("gate_up_proj", (32, 8)), ("down_proj", (8, 16))),
        shared_expert_bytes=0, non_expert_bytes=0, num_attention_heads=1, num_key_value_heads=1,
        head_dim=1, vocab_size=4)


HW_DOC = {
    "kind": "hardware_profile", "schema_version": 1, "name": "test",
    "source": {"kind": "preset", "date": "2026-11-29", "description": "round numbers for tests"},
    "host": {
        "cpu": "test cpu", "cores": {"value": 4, "source": "estimated"},
        "memory_bytes": {"value": 1e12, "source": "estimated"},
        "memcpy_gbps": {"value": 10.0, "source": "estimated"},
        "disk_read": {"latency_s": 0.001, "gbps": 0.5, "source": "estimated"},
        "codecs": {"sz3": {"decode": {"levels": [1.0], "gbps": [0.001], "source": "estimated"}}},
        "cpu_expert_ffn": {"hidden_size": 8, "intermediate_size": 16,
                           "curve": {"tokens": [1, 2], "seconds": [0.002, 0.004],
                                     "source": "estimated"}}},
    "gpu": {
        "name": "test gpu", "memory_bytes": {"value": 1e12, "source": "estimated"},
        "h2d_pinned": {"latency_s": 0.0005, "gbps": 1.0, "source": "estimated"},
        "h2d_pageable": {"latency_s": 0.0005, "gbps": 0.5, "source": "estimated"},
        "d2h_pinned": {"latency_s": 0.0005, "gbps": 1.0, "source": "estimated"},
        "d2h_pageable": {"latency_s": 0.0005, "gbps": 0.5, "source": "estimated"},
        "h2d_under_compute_gbps": {"value": 1.0, "source": "estimated"},
        "bf16_gemm_tflops": {"value": 100.0, "source": "estimated"},
        "d2d_gbps": {"value": 1000.0, "source": "estimated"},
        "decode": {"szp": {"levels": [1.0], "gbps": [0.00128], "source": "estimated"}}},
    "model_timings": [{
        "model": "test-geometry", "hidden_size": 8, "expert_intermediate_size": 16,
        "expert_ffn": {"tokens": [1, 2], "seconds": [0.00025, 0.0005], "source": "measured"},
        "attention_router": {"batch": [1], "context_tokens": [1], "seconds": [[0.0]],
                             "source": "measured"},
        "lm_head": {"tokens": [1], "seconds": [0.0], "source": "measured"}}],
}


def make_hardware(**changes):
    """The test profile; `changes` maps dotted paths to new values (e.g. gpu.h2d_pinned.gbps)."""
    doc = copy.deepcopy(HW_DOC)
    for path, value in changes.items():
        node = doc
        *head, last = path.split(".")
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    return profile_from_dict(doc, "test-hardware")


def trace_df(decode_steps, layers=(0,), prompt_id=0, task="t"):
    """A decode-only trace: `decode_steps[t][layer_pos]` is the tuple of experts of token t."""
    rows = []
    for t, per_layer in enumerate(decode_steps):
        for li, experts in enumerate(per_layer):
            for rank, e in enumerate(experts):
                rows.append((prompt_id, task, "decode", t, layers[li], rank, e, 1.0 / (rank + 1)))
    return pd.DataFrame(rows, columns=["prompt_id", "task", "phase", "token_idx", "layer", "rank",
                                       "expert", "gate"])


@pytest.fixture
def hardware():
    return make_hardware()
