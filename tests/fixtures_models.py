"""Tiny random-initialised MoE models of every architecture moesz supports, for tests.

Each config has hidden size 32, 3 decoder layers and 4 routed experts (top-2) of FFN width 24
(so no shape is ambiguous: 2*I != H and I != H); a model builds in well under a second on a CPU
and needs no download. DeepSeek configs keep their first layer dense,
qwen3_moe has a dense layer through `mlp_only_layers`, and qwen2_moe and DeepSeek carry shared
experts, so the expert map's dense-layer and shared-expert paths are exercised too.

Other contributors' tests may use these builders:

    from tests.fixtures_models import ARCHITECTURES, tiny_config, tiny_model, save_tiny_model
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                 "gpt_oss", "phimoe")
HIDDEN, LAYERS, EXPERTS, TOP_K, EXPERT_FFN, VOCAB = 32, 3, 4, 2, 24, 96

_COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
               num_experts_per_tok=TOP_K, tie_word_embeddings=False, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            n_group=1, topk_group=1, first_k_dense_replace=1, n_routed_experts=EXPERTS,
            n_shared_experts=1, moe_intermediate_size=EXPERT_FFN, intermediate_size=48,
            num_key_value_heads=4)
_PER_ARCH = {
    "mixtral": dict(num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN),
    "qwen2_moe": dict(num_experts=EXPERTS, moe_intermediate_size=EXPERT_FFN, intermediate_size=48,
                      shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=EXPERTS, moe_intermediate_size=EXPERT_FFN, intermediate_size=48,
                      head_dim=8, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=EXPERTS, intermediate_size=EXPERT_FFN),
    "deepseek_v2": dict(_MLA, topk_method="greedy"),
    "deepseek_v3": dict(_MLA),
    "gpt_oss": dict(num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN, head_dim=8,
                    sliding_window=16, max_position_embeddings=131072,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phimoe": dict(num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN),
}
# Decoder layers with routed experts in each tiny config.
MOE_LAYERS = {a: (1, 2) if a in ("deepseek_v2", "deepseek_v3", "qwen3_moe") else (0, 1, 2)
              for a in ARCHITECTURES}
# Per-expert tensors as stored (gpt_oss is [in, out] and has biases).
EXPERT_SHAPES = {a: {"gate_up_proj": (2 * EXPERT_FFN, HIDDEN), "down_proj": (HIDDEN, EXPERT_FFN)}
                 for a in ARCHITECTURES}
EXPERT_SHAPES["gpt_oss"] = {"gate_up_proj": (HIDDEN, 2 * EXPERT_FFN),
                            "gate_up_proj_bias": (2 * EXPERT_FFN,),
                            "down_proj": (EXPERT_FFN, HIDDEN), "down_proj_bias": (HIDDEN,)}


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """A tiny config of architecture `arch` (one of ARCHITECTURES, or "llama" for a dense one)."""
    if arch == "llama":
        kw = dict(_COMMON, intermediate_size=48)
        kw.pop("num_experts_per_tok")
    else:
        kw = dict(_COMMON, **_PER_ARCH[arch])
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               **overrides) -> PreTrainedModel:
    """A tiny random-initialised model in eval mode; the same seed gives the same weights.

    Router weights are drawn N(0, 1) so that tokens spread over the experts (some architectures
    initialise them to zero, which would send every token to experts 0 and 1).
    """
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0.0, 1.0)
        for p in model.parameters():  # buffers (rotary inv_freq) stay fp32, as from_pretrained
            p.data = p.data.to(dtype)   # leaves them
    return model.eval()


def save_tiny_model(arch: str, path: str | Path, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, **overrides) -> Path:
    """Save a tiny model as a safetensors checkpoint directory (config.json + model.safetensors)."""
    path = Path(path)
    tiny_model(arch, seed=seed, dtype=dtype, **overrides).save_pretrained(path)
    return path


def save_tiny_fp8_model(path: str | Path, seed: int = 0, block: int | None = 8) -> Path:
    """A tiny deepseek_v3 checkpoint whose routed experts are FP8 e4m3, as DeepSeek-V3 ships them.

    Each expert weight is stored as float8_e4m3fn; with `block`, a fp32 `weight_scale_inv` per
    block x block tile (value = e4m3 x scale) and a `quantization_config` naming the block, as in
    DeepSeek-V3's checkpoint; with `block=None`, plain e4m3 values without scales.
    """
    import json
    import re

    from safetensors.torch import load_file, save_file

    path = save_tiny_model("deepseek_v3", path, seed=seed, dtype=torch.bfloat16)
    tensors = load_file(path / "model.safetensors")
    out = {}
    for key, w in tensors.items():
        if not re.search(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$", key):
            out[key] = w
            continue
        w = w.float()
        if block is None:
            out[key] = w.to(torch.float8_e4m3fn)
            continue
        rows, cols = w.shape
        amax = w.reshape(rows // block, block, cols // block, block).abs().amax(dim=(1, 3))
        scale = amax / 448.0  # e4m3's largest finite value
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
        out[key] = (w / full).to(torch.float8_e4m3fn)
        out[key + "_scale_inv"] = scale
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     **({"weight_block_size": [block, block]} if block else {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


MXFP4_WIDTH = 64  # hidden and expert FFN width of the MXFP4 gpt_oss fixture: multiples of 32


def save_tiny_mxfp4_gpt_oss(path: str | Path, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A tiny gpt_oss checkpoint whose routed experts are MXFP4 as gpt-oss ships them.

    Each layer's `mlp.experts.gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H] (bf16, [in, out])
    is written as `*_blocks` uint8 [E, out, in/32, 16] and `*_scales` e8m0 uint8 [E, out, in/32]
    (quantized by moesz's MXFP4 reference, the layout transformers' `convert_moe_packed_tensors`
    reads), the biases stay bf16, and config.json carries `quantization_config` mxfp4 with the
    modules gpt-oss leaves unquantized; with `with_tokenizer`, the built-in model's character
    tokenizer, so the checkpoint can be profiled and evaluated on the built-in tasks.
    """
    import json
    import re

    import numpy as np
    from safetensors.torch import load_file, save_file

    from profiles.codecs.mxfp4 import to_gpt_oss

    path = save_tiny_model("gpt_oss", path, seed=seed, dtype=torch.bfloat16,
                           hidden_size=MXFP4_WIDTH, intermediate_size=MXFP4_WIDTH, head_dim=16)
    tensors = load_file(path / "model.safetensors")
    out = {}
    for key, w in tensors.items():
        m = re.search(r"mlp\.experts\.(gate_up_proj|down_proj)$", key)
        if not m:
            out[key] = w
            continue
        blocks, scales = zip(*(to_gpt_oss(w[e].float().t().numpy()) for e in range(w.shape[0])))
        out[key + "_blocks"] = torch.from_numpy(np.stack(blocks))
        out[key + "_scales"] = torch.from_numpy(np.stack(scales))
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if with_tokenizer:  # the built-in model's character tokenizer (21 symbols < the vocabulary)
        import shutil

        from profiles.models.loading import builtin_dir

        shutil.copy(builtin_dir() / "tokenizer.json", path / "tokenizer.json")
    return path


def model_cache(tmp_path_factory):
    """A getter of loaded tiny checkpoints by architecture, each saved (bf16 safetensors) and
    loaded once: the body of a module-scoped `models` fixture."""
    from profiles.models import load_model

    out = {}

    def get(arch):
        if arch not in out:
            out[arch] = load_model(str(save_tiny_model(arch, tmp_path_factory.mktemp(arch))))
        return out[arch]
    return get
