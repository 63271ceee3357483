"""A random checkpoint of any geometry written to disk with bounded memory, in the on-disk layout
transformers saves (experts per expert: `block_sparse_moe.experts.N.w1/w2/w3` for mixtral-like
architectures, `mlp.experts.N.gate_proj/up_proj/down_proj` for the others), sharded with an index.

For benchmarks and tests at real widths: a Mixtral-width layer is 5.6 GB of experts, more than a
test wants to hold, so tensors are generated and written in pieces of `CHUNK` values (bf16 N(0,
`SIGMA`), norms 1.0) and memory stays at one piece.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

SIGMA = 0.02
CHUNK = 1 << 24  # values generated at a time


def disk_tensors(arch: str, overrides: dict) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """On-disk (name, shape) of every tensor of a checkpoint of `arch`, as transformers 5 saves it
    (experts per expert), from a model built on the meta device; and the config dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    mixtral_like = arch in ("mixtral", "phimoe", "minimax")
    w = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral_like else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    out = []
    tied = getattr(config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if mixtral_like:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            stem, (e, rows, cols) = name[: -len("gate_up_proj")], t.shape
            for i in range(e):
                out.append((f"{stem}{i}.{w['gate']}.weight", (rows // 2, cols)))
                out.append((f"{stem}{i}.{w['up']}.weight", (rows // 2, cols)))
        elif name.endswith("experts.down_proj"):
            stem, (e, rows, cols) = name[: -len("down_proj")], t.shape
            out.extend((f"{stem}{i}.{w['down']}.weight", (rows, cols)) for i in range(e))
        else:
            out.append((name, tuple(t.shape)))
    return out, config.to_dict()


def random_bf16(n: int, rng: np.random.Generator, norm: bool):
    """n bf16 values (as uint16 bits) in pieces of CHUNK: ones for norms, N(0, SIGMA) otherwise."""
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        if norm:
            yield np.full(m, 0x3F80, dtype=np.uint16)  # 1.0
            continue
        v = (rng.standard_normal(m, dtype=np.float32) * SIGMA).view(np.uint32)
        yield ((v + 0x7FFF + ((v >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_random_checkpoint(out: Path, arch: str = "mixtral", layers: int = 2, shards: int = 4,
                            seed: int = 0, tokenizer: bool = True, **overrides) -> int:
    """Write a random bf16 checkpoint of `arch` (its default, real widths) with `layers` decoder
    layers into `out` as `shards` safetensors files plus the index; memory stays at one piece.
    Returns the bytes of tensor data written."""
    from profiles.fileio import atomic_write_json, atomic_write_with
    from profiles.models.files import INDEX, TensorOut, write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    tensors, config = disk_tensors(arch, {"num_hidden_layers": layers, **overrides})
    config["dtype"] = "bfloat16"
    total = sum(2 * int(np.prod(s)) for _, s in tensors)
    per_shard, groups, cur, size = total / shards, [], [], 0
    for name, shape in tensors:
        cur.append((name, shape))
        size += 2 * int(np.prod(shape))
        if size >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        outs = [TensorOut(n, "BF16", s, lambda n=n, s=s: random_bf16(
            int(np.prod(s)), rng, "norm" in n)) for n, s in group]
        atomic_write_with(out / fname, lambda p, o=outs: write_safetensors(
            p, o, {"format": "pt"}))
        weight_map.update({n: fname for n, _ in group})
    atomic_write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", config)
    if tokenizer:  # the built-in character tokenizer, so the built-in tasks run (ids < vocab)
        from profiles.models.loading import builtin_dir

        shutil.copyfile(builtin_dir() / "tokenizer.json", out / "tokenizer.json")
    return total
