"""Geometry from configs on the meta device, byte accounting per storage format, spec errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from profiles.errors import ModelError
from profiles.models import ModelGeometry, resolve_geometry, tensor_storage_bytes
from tests.fixtures_models import EXPERT_FFN, EXPERTS, HIDDEN, LAYERS, save_tiny_model, tiny_model

TINY_MIXTRAL = ("arch:mixtral,hidden_size=32,intermediate_size=24,num_hidden_layers=3,"
                "num_local_experts=4,num_experts_per_tok=2,num_attention_heads=4,"
                "num_key_value_heads=2,vocab_size=96,tie_word_embeddings=false")


def test_storage_bytes_per_format():
    assert tensor_storage_bytes((48, 32), "bf16") == 48 * 32 * 2
    assert tensor_storage_bytes((48, 32), "fp32") == 48 * 32 * 4
    assert tensor_storage_bytes((48,), "fp8_e4m3") == 48 * 2  # biases stay bf16
    # 1 byte a value + one fp32 scale per 128x128 block (DeepSeek-V3 layout)
    assert tensor_storage_bytes((4096, 7168), "fp8_e4m3") == 4096 * 7168 + 4 * 32 * 56
    assert tensor_storage_bytes((300, 200), "fp8_e4m3") == 300 * 200 + 4 * 3 * 2  # partial blocks
    assert tensor_storage_bytes((300, 200), "fp8_e4m3", fp8_block=None) == 300 * 200
    # MXFP4: 4 bits a value + 1 E8M0 byte per 32 values
    assert tensor_storage_bytes((2880, 5760), "mxfp4") == 2880 * 5760 // 2 + 2880 * 5760 // 32
    with pytest.raises(ModelError, match="choose one of bf16"):
        tensor_storage_bytes((4, 4), "int3")


def test_arch_geometry_matches_a_real_tiny_model():
    g = resolve_geometry(TINY_MIXTRAL)
    assert (g.architecture, g.num_layers, g.moe_layers) == ("mixtral", LAYERS, (0, 1, 2))
    assert (g.experts_per_layer, g.top_k, g.hidden_size) == (EXPERTS, 2, HIDDEN)
    assert g.expert_intermediate_size == EXPERT_FFN and g.dtype == "bf16"
    assert g.bytes_per_expert == 2 * (2 * EXPERT_FFN * HIDDEN + HIDDEN * EXPERT_FFN)
    # independent count: every parameter of the same model, really built
    model = tiny_model("mixtral")
    total = sum(p.numel() for p in model.parameters()) * 2
    assert g.routed_expert_bytes + g.non_expert_bytes == total
    assert g.shared_expert_bytes == 0


def test_dtype_override_and_default():
    bf16 = resolve_geometry(TINY_MIXTRAL)
    fp32 = resolve_geometry(TINY_MIXTRAL + ",dtype=fp32")
    assert fp32.dtype == "fp32" and fp32.bytes_per_expert == 2 * bf16.bytes_per_expert
    assert fp32.non_expert_bytes == 2 * bf16.non_expert_bytes
    with pytest.raises(ModelError, match="dtype 'int4'.*choose one of"):
        resolve_geometry(TINY_MIXTRAL + ",dtype=int4")


def test_shared_experts_are_counted_in_non_expert_bytes():
    spec = ("arch:qwen2_moe,hidden_size=32,moe_intermediate_size=24,intermediate_size=48,"
            "shared_expert_intermediate_size=24,num_hidden_layers=3,num_experts=4,"
            "num_experts_per_tok=2,num_attention_heads=4,num_key_value_heads=2,vocab_size=96")
    g = resolve_geometry(spec)
    # per layer: gate, up, down (3 x 32 x 24) + the shared-expert gate (1 x 32), bf16
    assert g.shared_expert_bytes == 3 * 2 * (3 * 32 * 24 + 32)
    assert g.non_expert_bytes > g.shared_expert_bytes


def test_geometry_of_a_checkpoint_directory_counts_the_file(tmp_path):
    path = save_tiny_model("mixtral", tmp_path / "m", dtype=torch.bfloat16)
    g = resolve_geometry(str(path))
    assert g.name == str(path) and g.dtype == "bf16"
    from profiles.models.checkpoint import safetensors_total_bytes

    assert g.routed_expert_bytes + g.non_expert_bytes == safetensors_total_bytes(path)
    assert g.bytes_per_expert == resolve_geometry(TINY_MIXTRAL).bytes_per_expert


def test_mxfp4_checkpoint_has_a_geometry(tmp_path):
    from tests.fixtures_models import MXFP4_WIDTH as W
    from tests.fixtures_models import save_tiny_mxfp4_gpt_oss

    g = resolve_geometry(str(save_tiny_mxfp4_gpt_oss(tmp_path / "g")))
    assert g.dtype == "mxfp4"
    # gate_up 64x128 and down 64x64 at 4.25 bits a value (blocks + e8m0 scales), biases in bf16
    assert g.bytes_per_expert == (W * 2 * W // 2 + W * 2 * W // 32) + (W * W // 2 + W * W // 32) \
        + 2 * (2 * W + W)


def test_geometry_is_frozen_and_serializable():
    g = resolve_geometry(TINY_MIXTRAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.top_k = 3
    d = json.loads(json.dumps(g.to_dict()))
    assert d["moe_layers"] == [0, 1, 2] and d["expert_tensor_shapes"]["down_proj"] == [32, 24]
    assert [f.name for f in dataclasses.fields(ModelGeometry)] == [
        "name", "architecture", "num_layers", "moe_layers", "experts_per_layer", "top_k",
        "hidden_size", "expert_intermediate_size", "dtype", "bytes_per_expert",
        "expert_tensor_shapes", "shared_expert_bytes", "non_expert_bytes", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size"]


@pytest.mark.parametrize("spec, message", [
    ("arch:nosuchmodel", "no architecture 'nosuchmodel'"),
    ("arch:mixtral,num_local_expert=4", "no key 'num_local_expert'"),
    ("arch:mixtral,num_local_experts", "is not key=value"),
    ("arch:", "missing name"),
    ("preset:mixtral-7x8b", "preset 'mixtral-7x8b' does not exist; choose one of"),
    ("arch:llama", "no routed-expert layers"),
    ("arch:deepseek_v2", "no top-k"),
    ("/no/such/dir", "no such directory; expected builtin, a local directory"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_geometry(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_geometry(str(tmp_path))
