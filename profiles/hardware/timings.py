"""Per-model compute timings for the simulator: one expert's FFN and one layer's attention + router.

For a model geometry, on the GPU when there is one (else the CPU), in the model's compute dtype
(bf16 unless the geometry says fp16/fp32):

- `expert_ffn`: seconds of one routed expert (SwiGLU of the geometry's hidden and expert widths)
  against the tokens it serves;
- `attention_router`: seconds of one decoder layer's attention for a decode step (one new token per
  sequence attending to a KV cache of `context` tokens, with the model's query / KV head counts and
  head dimension; grouped-query attention through `scaled_dot_product_attention`) plus its router
  (logits, softmax, top-k), against batch and context;
- `lm_head`: seconds of the output projection against tokens.

Shapes that do not fit the measuring budget here (weights or KV cache too large for this device)
are estimated by a roofline, labelled `estimated`: time = max(FLOP / rate, bytes / bandwidth),
with the rate and bandwidth measured on this machine (GPU: bf16 GEMM TFLOP/s and device copy GB/s;
CPU: the measured CPU expert FFN rate and memory-copy GB/s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from profiles.hardware.fit import median_seconds
from profiles.hardware.measure import time_expert_ffn
from profiles.hardware.schema import AttentionTimings, GpuProfile, HostProfile, ModelTimings, TokenCurve

FFN_TOKENS = (1, 4, 16, 64, 256)
BATCHES = (1, 4, 16, 64)
CONTEXTS = (128, 512, 2048)
# Largest weights, and KV cache, measured for real: above them the figures are estimated.
_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 24 << 30}
_KV_BUDGET_BYTES = {"cpu": 512 << 20, "cuda": 48 << 30}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_timings(geometry, host: HostProfile, gpu: GpuProfile | None, raw: dict,
                  quick: bool = False) -> ModelTimings:
    """Measured (or, for shapes too big here, estimated) timings of `geometry`'s layers.

    Args:
        geometry: the model's `ModelGeometry`.
        host: the measured host section (roofline rates for estimates without a GPU).
        gpu: the measured GPU section, or None to time on the CPU.
        raw: the profile's raw samples, extended here.
        quick: fewer token counts, batches and context lengths (a smoke test).
    """
    tokens = FFN_TOKENS[:3] if quick else FFN_TOKENS
    batches = BATCHES[:2] if quick else BATCHES
    contexts = CONTEXTS[:2] if quick else CONTEXTS
    device = "cuda" if gpu is not None else "cpu"
    dtype = _DTYPES.get(geometry.dtype, torch.bfloat16)
    esize = torch.finfo(dtype).bits // 8
    g = geometry
    hidden, width = g.hidden_size, g.expert_intermediate_size
    q_dim, kv_dim = g.num_attention_heads * g.head_dim, g.num_key_value_heads * g.head_dim
    attn_params = hidden * q_dim * 2 + hidden * kv_dim * 2 + hidden * g.experts_per_layer
    kv_bytes = max(batches) * max(contexts) * 2 * kv_dim * esize      # [B, C, 2 (k, v), kv_dim]
    budget = _BUDGET_BYTES[device]
    expert_params = 3 * hidden * width
    key = f"model_timings.{g.name}"
    raw[key] = {"device": device, "dtype": str(dtype).split(".")[-1]}
    where = f"on {device}" + (f" ({gpu.name})" if gpu is not None else "")

    if expert_params * esize * 2 <= budget:
        meds, samples = time_expert_ffn(hidden, width, tokens, device, dtype, min_total_s=0.05)
        raw[key]["expert_ffn"] = samples
        ffn = TokenCurve(tokens, tuple(meds), "measured",
                         f"SwiGLU expert {hidden}x{width} {where}, median of at least 3 "
                         f"runs and 50 ms")
    else:
        rate, bw = _roofline_rates(host, gpu)
        secs = tuple(max(2 * expert_params * t / rate, expert_params * esize / bw)
                     for t in tokens)
        ffn = TokenCurve(tokens, secs, "estimated", _roof_note(rate, bw, where))

    if attn_params * esize * 2 <= budget and kv_bytes <= _KV_BUDGET_BYTES[device]:
        secs_grid, samples = _time_attention(g, device, dtype, batches, contexts)
        raw[key]["attention_router"] = samples
        attn = AttentionTimings(batches, contexts, secs_grid, "measured",
                                f"decode step, GQA attention {g.num_attention_heads}/"
                                f"{g.num_key_value_heads} heads of dim {g.head_dim} plus router "
                                f"over {g.experts_per_layer} experts {where}, median of at least 3 "
                                f"runs and 50 ms")
    else:
        rate, bw = _roofline_rates(host, gpu)
        grid = []
        for b in batches:
            row = []
            for c in contexts:
                # projections + router: 2 FLOP per weight per token; QK^T and AV: 4 * q_dim * c
                flop = 2 * b * attn_params + 4 * b * q_dim * c
                nbytes = attn_params * esize + b * c * 2 * kv_dim * esize
                row.append(max(flop / rate, nbytes / bw))
            grid.append(tuple(row))
        attn = AttentionTimings(batches, contexts, tuple(grid), "estimated",
                                _roof_note(rate, bw, where))

    head_params = hidden * max(g.vocab_size, 1)
    if head_params * esize * 2 <= budget:
        meds, samples = _time_lm_head(hidden, g.vocab_size, device, dtype, tokens)
        raw[key]["lm_head"] = samples
        lm = TokenCurve(tokens, tuple(meds), "measured",
                        f"output projection {hidden}x{g.vocab_size} {where}, median of at "
                        f"least 3 runs and 50 ms")
    else:
        rate, bw = _roofline_rates(host, gpu)
        lm = TokenCurve(tokens, tuple(max(2 * head_params * t / rate, head_params * esize / bw)
                                      for t in tokens), "estimated",
                        _roof_note(rate, bw, where))
    return ModelTimings(model=g.name, hidden_size=hidden, expert_intermediate_size=width,
                        expert_ffn=ffn, attention_router=attn, lm_head=lm)


def _roofline_rates(host: HostProfile, gpu: GpuProfile | None) -> tuple[float, float]:
    """(FLOP/s, bytes/s) measured on this machine, for roofline estimates."""
    if gpu is not None:
        return gpu.bf16_gemm_tflops.value * 1e12, gpu.d2d_gbps.value * 1e9
    ffn = host.cpu_expert_ffn
    t = ffn.curve.tokens[-1]
    rate = 2 * ffn.params * t / ffn.curve.seconds[-1]   # FLOP/s at the largest measured batch
    return rate, host.memcpy_gbps.value * 1e9


def _roof_note(rate: float, bw: float, where: str) -> str:
    return (f"roofline max(FLOP / {rate / 1e12:.3g} TFLOP/s, bytes / {bw / 1e9:.3g} GB/s), both "
            f"measured {where}; the shapes are too large to run in this profile's budget")


def _sync(device: str):
    return (lambda: torch.cuda.synchronize()) if device == "cuda" else None


def _time_attention(g, device: str, dtype, batches, contexts
                    ) -> tuple[tuple[tuple[float, ...], ...], dict]:
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h, nh, nkv, hd = g.hidden_size, g.num_attention_heads, g.num_key_value_heads, g.head_dim

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dev, dtype)

    wq, wk, wv, wo, wr = w(nh * hd, h), w(nkv * hd, h), w(nkv * hd, h), w(h, nh * hd), \
        w(g.experts_per_layer, h)
    rows, samples = [], {}
    with torch.inference_mode():
        for b in batches:
            row = []
            for c in contexts:
                x = w(b, 1, h)
                k_cache, v_cache = w(b, nkv, c, hd), w(b, nkv, c, hd)

                def step():
                    q = (x @ wq.T).view(b, 1, nh, hd).transpose(1, 2)        # [b, nh, 1, hd]
                    k_new, v_new = x @ wk.T, x @ wv.T                         # [b, 1, nkv*hd]
                    o = F.scaled_dot_product_attention(q, k_cache, v_cache,
                                                       enable_gqa=nh != nkv)  # [b, nh, 1, hd]
                    y = o.transpose(1, 2).reshape(b, 1, nh * hd) @ wo.T       # [b, 1, h]
                    logits = (y @ wr.T).float().softmax(-1)                   # router
                    return logits.topk(min(g.top_k, g.experts_per_layer), -1), k_new, v_new

                med, s = median_seconds(step, 3, _sync(device), min_total_s=0.05)
                row.append(med)
                samples[f"{b}x{c}"] = s
            rows.append(tuple(row))
    return tuple(rows), samples


def _time_lm_head(hidden: int, vocab: int, device: str, dtype, tokens
                  ) -> tuple[list[float], dict]:
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    head = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(dev, dtype)
    meds, samples = [], {}
    with torch.inference_mode():
        for t in tokens:
            x = torch.randn(t, hidden, generator=gen).to(dev, dtype)
            med, s = median_seconds(lambda: x @ head.T, 3, _sync(device), min_total_s=0.05)
            meds.append(med)
            samples[str(t)] = s
    return meds, samples
