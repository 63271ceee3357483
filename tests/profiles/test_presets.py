"""Named presets against REFERENCE section 4 (expert sizes of real models, bf16 from their configs).

Each published figure is checked to the precision it is quoted with: "352 MB" must round to 352,
"1.3 TB" to 1.3. MB, GB and TB are decimal (1e6, 1e9, 1e12 bytes).
"""

from __future__ import annotations

import functools

import pytest

from profiles.errors import ModelError
from profiles.models import PRESETS, get_preset, resolve_geometry

REQUIRED = ("mixtral-8x7b", "deepseek-v3", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b",
            "moonlight-16b-a3b", "gpt-oss-120b")

# name: (per expert, unit, decimals quoted), (experts a layer, MoE layers), top-k, (all, unit, dec)
REFERENCE_TABLE = {
    "mixtral-8x7b": ((352, 1e6, 0), (8, 32), 2, (90, 1e9, 0)),
    "deepseek-v3": ((88, 1e6, 0), (256, 58), 8, (1.3, 1e12, 1)),
    "qwen1.5-moe-a2.7b": ((17.3, 1e6, 1), (60, 24), 4, (25, 1e9, 0)),
    "qwen3-30b-a3b": ((9.4, 1e6, 1), (128, 48), 8, (58, 1e9, 0)),
    "olmoe-1b-7b": ((12.6, 1e6, 1), (64, 16), 8, (13, 1e9, 0)),
    "moonlight-16b-a3b": ((17.3, 1e6, 1), (64, 26), 6, (29, 1e9, 0)),
    "gpt-oss-120b": ((49.8, 1e6, 1), (128, 36), 4, (229, 1e9, 0)),
}


@functools.lru_cache(maxsize=None)
def geometry(spec: str):
    return resolve_geometry(spec)


def _rounds_to(value_bytes: int, published: float, unit: float, decimals: int) -> bool:
    return round(value_bytes / unit, decimals) == published


def test_every_required_preset_exists():
    assert set(REQUIRED) <= set(PRESETS)


@pytest.mark.parametrize("name", REQUIRED)
def test_preset_matches_reference_table(name):
    (per, per_unit, per_dec), (experts, layers), top_k, (total, unit, dec) = REFERENCE_TABLE[name]
    g = geometry(f"preset:{name}")
    assert g.dtype == "bf16"
    assert _rounds_to(g.bytes_per_expert, per, per_unit, per_dec), g.bytes_per_expert
    assert (g.experts_per_layer, len(g.moe_layers), g.top_k) == (experts, layers, top_k)
    assert _rounds_to(g.routed_expert_bytes, total, unit, dec), g.routed_expert_bytes


def test_expert_shapes_quoted_in_reference():
    assert dict(geometry("preset:mixtral-8x7b").expert_tensor_shapes) == {
        "gate_up_proj": (2 * 14336, 4096), "down_proj": (4096, 14336)}  # 3 x 4096 x 14336
    assert dict(geometry("preset:deepseek-v3").expert_tensor_shapes) == {
        "gate_up_proj": (2 * 2048, 7168), "down_proj": (7168, 2048)}  # 3 x 7168 x 2048
    oss = dict(geometry("preset:gpt-oss-120b").expert_tensor_shapes)
    assert oss["gate_up_proj"] == (2880, 5760) and oss["down_proj"] == (2880, 2880)
    assert oss["gate_up_proj_bias"] == (5760,) and oss["down_proj_bias"] == (2880,)


def test_moonlight_geometry_of_the_study():
    """REFERENCE 1: 26 MoE layers after one dense layer, 64 experts top-6, 2 shared experts,
    hidden 2048, expert FFN 1408, one routed expert about 8.65 M parameters."""
    g = geometry("preset:moonlight-16b-a3b")
    assert g.moe_layers == tuple(range(1, 27)) and g.num_layers == 27
    assert (g.hidden_size, g.expert_intermediate_size) == (2048, 1408)
    assert round(g.bytes_per_expert / 2 / 1e6, 2) == 8.65
    assert g.shared_expert_bytes == 26 * 2 * g.bytes_per_expert  # two shared experts a layer


def test_shipped_formats():
    """DeepSeek-V3 ships FP8 experts (44 MB, 650 GB), gpt-oss MXFP4 (about 13 MB)."""
    assert get_preset("deepseek-v3").shipped_dtype == "fp8_e4m3"
    fp8 = geometry("preset:deepseek-v3,dtype=fp8_e4m3")
    assert round(fp8.bytes_per_expert / 1e6) == 44
    assert round(fp8.routed_expert_bytes / 1e9, -1) == 650
    mx = geometry("preset:gpt-oss-120b,dtype=mxfp4")
    assert round(mx.bytes_per_expert / 1e6) == 13


def test_transformers_defaults_that_are_not_the_real_models():
    """Why presets exist: qwen3_moe defaults to 24 layers, olmoe to an expert width of 2048."""
    assert len(geometry("arch:qwen3_moe").moe_layers) == 24
    assert len(geometry("preset:qwen3-30b-a3b").moe_layers) == 48
    assert geometry("arch:olmoe").expert_intermediate_size == 2048
    assert geometry("preset:olmoe-1b-7b").expert_intermediate_size == 1024
    # ... and mixtral's default is Mixtral-8x7B
    mixtral = geometry("preset:mixtral-8x7b")
    assert geometry("arch:mixtral").bytes_per_expert == mixtral.bytes_per_expert


def test_preset_overrides_and_unknown_preset():
    g = geometry("preset:olmoe-1b-7b,num_hidden_layers=4")
    assert len(g.moe_layers) == 4 and g.expert_intermediate_size == 1024
    with pytest.raises(ModelError, match="choose one of .*mixtral-8x7b"):
        get_preset("mixtral")
