"""Loading local safetensors checkpoints: dtypes, FP8 dequantization, fingerprints, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from profiles.errors import ModelError
from profiles.models import load_model, resolve_geometry
from profiles.models.loading import builtin_dir
from tests.fixtures_models import save_tiny_fp8_model, save_tiny_model, tiny_model

IDS = torch.arange(3, 23).reshape(2, 10)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny_model("mixtral", tmp_path_factory.mktemp("ckpt") / "mixtral", seed=1)


def test_load_bf16_checkpoint(mixtral_dir):
    loaded = load_model(str(mixtral_dir))
    assert loaded.spec == str(mixtral_dir) and loaded.tokenizer is None
    assert loaded.model.dtype == torch.bfloat16 and not loaded.model.training
    assert loaded.geometry.dtype == "bf16" and loaded.geometry.moe_layers == (0, 1, 2)
    assert loaded.geometry == resolve_geometry(str(mixtral_dir))
    reference = tiny_model("mixtral", seed=1, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, reference(IDS).logits)


def test_load_dtype_override(mixtral_dir):
    loaded = load_model(str(mixtral_dir), dtype="fp32")
    assert loaded.model.dtype == torch.float32
    assert loaded.geometry.dtype == "bf16"  # bytes stay those of the checkpoint
    with pytest.raises(ModelError, match="choose one of"):
        load_model(str(mixtral_dir), dtype="int8")


def test_fingerprint_is_stable_and_tells_a_fine_tune(mixtral_dir, tmp_path):
    a, b = load_model(str(mixtral_dir)), load_model(str(mixtral_dir))
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("fp2:")
    # a "fine-tune": every expert weight moves a little
    tuned = tiny_model("mixtral", seed=1, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "experts" in name:
                p.add_(torch.randn_like(p) * 1e-3)
    tuned.save_pretrained(tmp_path / "tuned")
    assert load_model(str(tmp_path / "tuned")).fingerprint != a.fingerprint
    # another base model of the same shapes
    other = save_tiny_model("mixtral", tmp_path / "other", seed=2)
    assert load_model(str(other)).fingerprint != a.fingerprint


def test_fp8_block_scaled_experts_are_dequantized_exactly(tmp_path):
    path = save_tiny_fp8_model(tmp_path / "fp8", block=8)
    loaded = load_model(str(path))
    assert loaded.model.dtype == torch.float32 and loaded.geometry.dtype == "fp8_e4m3"
    # per expert: 48x32 + 32x24 e4m3 bytes + one fp32 scale per 8x8 block (6x4 + 4x3 blocks)
    assert loaded.geometry.bytes_per_expert == 48 * 32 + 32 * 24 + 4 * (6 * 4 + 4 * 3)
    raw = load_file(path / "model.safetensors")
    for layer, expert in [(1, 0), (2, 3)]:
        pre = f"model.layers.{layer}.mlp.experts.{expert}."
        want = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            q, s = raw[pre + proj + ".weight"], raw[pre + proj + ".weight_scale_inv"]
            want[proj] = q.float() * s.repeat_interleave(8, 0).repeat_interleave(8, 1)
        got = loaded.expert_map.get(layer, expert).tensors
        assert torch.equal(got["gate_up_proj"], torch.cat([want["gate_proj"], want["up_proj"]]))
        assert torch.equal(got["down_proj"], want["down_proj"])
    with torch.no_grad():
        assert loaded.model(IDS).logits.isfinite().all()


def test_fp8_values_without_scales_upcast_bit_exactly(tmp_path):
    path = save_tiny_fp8_model(tmp_path / "fp8plain", block=None)
    loaded = load_model(str(path), dtype="bf16")  # e4m3 values are exact in bf16 too
    assert loaded.geometry.bytes_per_expert == 48 * 32 + 32 * 24  # 1 byte a value, no scales
    q = load_file(path / "model.safetensors")["model.layers.2.mlp.experts.1.down_proj.weight"]
    down = loaded.expert_map.get(2, 1).tensors["down_proj"]
    assert torch.equal(down.to(torch.float8_e4m3fn).view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(down.float(), q.float())


def test_a_config_claiming_mxfp4_over_bf16_experts_is_refused(tmp_path):
    path = save_tiny_model("gpt_oss", tmp_path / "oss")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="quantization_config mxfp4, but the expert tensors in "
                                         "the files are BF16"):
        resolve_geometry(str(path))
    with pytest.raises(ModelError, match="quantization_config mxfp4"):
        load_model(str(path))


def test_pickle_checkpoints_are_refused(tmp_path):
    path = save_tiny_model("olmoe", tmp_path / "pkl")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle.*safetensors only"):
        load_model(str(path))


def test_model_without_moe_layers(tmp_path):
    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    with pytest.raises(ModelError, match="no routed-expert layers"):
        load_model(str(path))


@pytest.mark.parametrize("spec, message", [
    ("/no/such/checkpoint", "no such directory"),
    ("preset:mixtral-8x7b", "geometry without weights"),
    ("arch:olmoe", "geometry without weights"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ModelError, match=message):
        load_model(spec)


def test_builtin_loads_or_says_it_is_not_built():
    if (builtin_dir() / "model.safetensors").exists():
        loaded = load_model("builtin")
        assert loaded.geometry.name == "builtin" and len(loaded.geometry.moe_layers) >= 8
        assert loaded.tokenizer is not None
    else:  # the lead's loader or ours says what is missing and how to train it
        with pytest.raises(ModelError, match=r"built-in model.*(not built yet|missing).*train"):
            load_model("builtin")
        with pytest.raises(ModelError, match="built-in model weights are not built yet"):
            resolve_geometry("builtin")


def test_builtin_geometry_follows_moesz_builtin_dir(tmp_path, monkeypatch):
    """`MOESZ_BUILTIN_DIR` moves the built-in model for geometry as for weights."""
    cfg = json.loads((builtin_dir() / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("MOESZ_BUILTIN_DIR", str(tmp_path))
    assert builtin_dir() == tmp_path
    assert len(resolve_geometry("builtin").moe_layers) == 3
    monkeypatch.setenv("MOESZ_BUILTIN_DIR", str(tmp_path / "absent"))
    with pytest.raises(ModelError, match="not built yet"):
        resolve_geometry("builtin")


@pytest.mark.parametrize("spec, message", [
    ("preset:olmoe-1b-7b,num_experts=abc", "num_experts='abc' must be an integer >= 1"),
    ("preset:olmoe-1b-7b,num_experts=-4", "num_experts=-4 must be an integer >= 1"),
    ("preset:olmoe-1b-7b,num_hidden_layers=0", "num_hidden_layers=0 must be an integer >= 1"),
    ("preset:olmoe-1b-7b,num_experts=4", "routes top-8 of 4 experts"),
])
def test_bad_geometry_overrides_are_model_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_geometry(spec)
