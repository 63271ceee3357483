"""Named geometries of real MoE models (`preset:NAME`).

Some transformers default configs are real models and some are not (qwen3_moe's default has 24
layers where Qwen3-30B-A3B has 48; olmoe's expert width is 2048 where OLMoE-1B-7B's is 1024), so
each preset spells out the shape-determining fields of the model's published `config.json` on the
Hugging Face Hub instead of relying on defaults. A preset is built on the `meta` device like any
other config; the byte counts come from the module shapes.

`shipped_dtype` is the format the publisher's checkpoint stores its experts in; geometries are bf16
unless the spec says `dtype=` (for example `preset:deepseek-v3,dtype=fp8_e4m3`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from profiles.errors import ModelError


@dataclass(frozen=True)
class Preset:
    """A real model's architecture, the config fields that fix its shapes, and their source."""

    name: str
    architecture: str
    source: str
    shipped_dtype: str
    config: dict = field(default_factory=dict)


_DEEPSEEK_MLA = dict(q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                     v_head_dim=128)
_GPT_OSS = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                num_key_value_heads=8, head_dim=64, vocab_size=201088, num_experts_per_tok=4,
                sliding_window=128)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("mixtral-8x7b", "mixtral", "mistralai/Mixtral-8x7B-v0.1 config.json", "bf16", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
    Preset("mixtral-8x22b", "mixtral", "mistralai/Mixtral-8x22B-v0.1 config.json", "bf16", dict(
        hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32768)),
    Preset("deepseek-v3", "deepseek_v3", "deepseek-ai/DeepSeek-V3 config.json", "fp8_e4m3", dict(
        _DEEPSEEK_MLA, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        n_group=8, topk_group=4, vocab_size=129280)),
    Preset("moonlight-16b-a3b", "deepseek_v3", "moonshotai/Moonlight-16B-A3B config.json", "bf16",
           dict(_DEEPSEEK_MLA, q_lora_rank=None, hidden_size=2048, intermediate_size=11264,
                moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
                num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                vocab_size=163840)),
    Preset("deepseek-v2-lite", "deepseek_v2", "deepseek-ai/DeepSeek-V2-Lite config.json", "bf16",
           dict(_DEEPSEEK_MLA, q_lora_rank=None, hidden_size=2048, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
                num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                topk_method="greedy", vocab_size=102400)),
    Preset("qwen1.5-moe-a2.7b", "qwen2_moe", "Qwen/Qwen1.5-MoE-A2.7B config.json", "bf16", dict(
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, vocab_size=151936)),
    Preset("qwen3-30b-a3b", "qwen3_moe", "Qwen/Qwen3-30B-A3B config.json", "bf16", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, vocab_size=151936)),
    Preset("qwen3-235b-a22b", "qwen3_moe", "Qwen/Qwen3-235B-A22B config.json", "bf16", dict(
        hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, vocab_size=151936)),
    Preset("olmoe-1b-7b", "olmoe", "allenai/OLMoE-1B-7B-0924 config.json", "bf16", dict(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304)),
    Preset("phi-3.5-moe", "phimoe", "microsoft/Phi-3.5-MoE-instruct config.json", "bf16", dict(
        hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, vocab_size=32064)),
    Preset("gpt-oss-120b", "gpt_oss", "openai/gpt-oss-120b config.json", "mxfp4",
           dict(_GPT_OSS, num_hidden_layers=36, num_local_experts=128)),
    Preset("gpt-oss-20b", "gpt_oss", "openai/gpt-oss-20b config.json", "mxfp4",
           dict(_GPT_OSS, num_hidden_layers=24, num_local_experts=32)),
)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ModelError listing the presets when there is none."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"preset {name!r} does not exist; choose one of "
                         f"{', '.join(sorted(PRESETS))}") from None


def list_presets() -> list[Preset]:
    return [PRESETS[n] for n in sorted(PRESETS)]
