"""Where a checkpoint keeps its routed experts on disk, mapped to the tensors moesz works with.

transformers 5 fuses each layer's experts in memory (`experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I]; gate rows first, then up), and moesz names an expert's tensors the
same way everywhere (policies, packed records, fingerprints): `gate_up_proj` and `down_proj`, plus
`gate_up_proj_bias` and `down_proj_bias` where the architecture has them. Checkpoints on disk hold
them in one of two layouts, both mapped here to the same (layer, expert, tensor) records:

| on disk | architectures | `gate_up_proj` of expert e | `down_proj` of expert e |
|---|---|---|---|
| per expert, `w1/w2/w3` | mixtral, phimoe, minimax (`block_sparse_moe`) | rows of `experts.e.w1` then `experts.e.w3` | `experts.e.w2` |
| per expert, `gate/up/down_proj` | qwen2_moe, qwen3_moe, olmoe, deepseek_v2/v3 | rows of `experts.e.gate_proj` then `experts.e.up_proj` | `experts.e.down_proj` |
| fused | gpt_oss (as stored, [E, H, 2I]: in, out), llama4 | slice e of `experts.gate_up_proj` | slice e of `experts.down_proj` |
| fused MXFP4 | gpt_oss as OpenAI ships it | slice e of `experts.gate_up_proj_blocks` and `_scales` | slice e of `experts.down_proj_blocks` and `_scales` |

Each record is a list of contiguous byte ranges in the files (`Part`), so an expert tensor is read
by concatenating ranges of the memory-mapped shards, and a single element is found without
reading the rest. FP8 (e4m3) per-expert weights carry their `weight_scale_inv` beside them.
gpt-oss's MXFP4 experts (`*_blocks` uint8 [E, out, in/32, 16], `*_scales` e8m0 uint8
[E, out, in/32]; biases bf16) map to an `ExpertTensor` of format `mxfp4` with the in-memory
shape [in, out] and two parts, the expert's blocks and its scales; reading it dequantizes exactly
(`profiles.codecs.mxfp4.decode_gpt_oss`, transformers' own arithmetic), and its stored bytes are
the blocks' and scales' bytes.

Non-expert weights keep their on-disk names except where the architecture renames a module in
memory (`_RENAMES`: mixtral's `block_sparse_moe` is `mlp`; phimoe's router too). Decoder layers
past the config's `num_hidden_layers` are not part of the model transformers builds (DeepSeek-V3
stores its multi-token-prediction module, experts and all, as `model.layers.61`): their tensors
are set aside (`ExpertLayout.beyond`), neither experts nor weights to load.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from profiles.errors import ModelError
from profiles.models.files import ST_DTYPES, STORAGE_NAMES, CheckpointFiles

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]+)\.experts\."
                    r"(?P<rest>.+)$")
_PER_EXPERT = re.compile(r"^(?P<e>\d+)\.(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
                         r"(?P<scale>_scale_inv)?$")
_FUSED = re.compile(r"^(?P<w>gate_up_proj|down_proj)(?P<bias>_bias|_blocks|_scales)?$")
_GATE_UP = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}
TENSOR_ORDER = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_ANY_LAYER = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.")
_SHARED = re.compile(r"\.(shared_expert|shared_experts|shared_expert_gate)\.")
# in-memory renames of non-expert weights (transformers' conversion mapping, rename rules only)
_RENAMES = {
    "mixtral": ((r"\.block_sparse_moe\.", ".mlp."),),
    "minimax": ((r"\.block_sparse_moe\.", ".mlp."),),
    "phimoe": ((r"\.block_sparse_moe\.", ".mlp."), (r"\.gate\.weight$", ".router.weight")),
}
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Part:
    """A contiguous byte range of one on-disk tensor that forms (part of) an expert tensor."""

    tensor: str         # the on-disk tensor name
    file: Path
    offset: int         # absolute byte offset in `file`
    numel: int
    dtype: str          # safetensors dtype
    shape: tuple[int, ...]
    scale: str | None = None   # an FP8 part's `weight_scale_inv` tensor


@dataclass(frozen=True)
class ExpertTensor:
    """One of an expert's tensors as moesz names it, and the on-disk parts whose rows it stacks."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    format: str = "plain"   # "mxfp4": parts are (blocks, scales) in gpt-oss's layout

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> str:
        """The safetensors dtype of the values, or "MXFP4" for gpt-oss blocks and scales."""
        return "MXFP4" if self.format == "mxfp4" else self.parts[0].dtype

    @property
    def stored_bytes(self) -> int:
        """Bytes the files hold for this tensor (blocks and scales of an MXFP4 one)."""
        return sum(p.numel * ST_DTYPES[p.dtype][0] for p in self.parts)


@dataclass(frozen=True)
class ExpertLayout:
    """Every routed expert of a checkpoint, located in its files.

    Attributes:
        kind: "per-expert" or "fused" (how the files hold the experts).
        moe_layers: decoder layers with routed experts, ascending.
        experts_per_layer: routed experts in each MoE layer.
        experts: (layer, expert) -> that expert's tensors in `TENSOR_ORDER`.
        routed: on-disk names of every routed-expert tensor (FP8 scales included).
        shared: on-disk names of the shared experts' tensors.
        beyond: on-disk names of the tensors of decoder layers past the config's
            `num_hidden_layers` (a multi-token-prediction layer), which the model does not have.
    """

    kind: str
    moe_layers: tuple[int, ...]
    experts_per_layer: int
    experts: dict[tuple[int, int], tuple[ExpertTensor, ...]]
    routed: frozenset[str]
    shared: frozenset[str]
    beyond: frozenset[str] = frozenset()

    @property
    def tensor_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        first = self.experts[(self.moe_layers[0], 0)]
        return tuple((t.name, t.shape) for t in first)

    def layer_keys(self, layer: int) -> list[tuple[int, int]]:
        return [(layer, e) for e in range(self.experts_per_layer)]


def expert_layout(files: CheckpointFiles, config=None) -> ExpertLayout:
    """Find the routed experts in a checkpoint's files.

    Args:
        files: the opened checkpoint.
        config: its transformers config (to check the expert count), or None.

    Raises:
        ModelError: no routed experts (a dense model), experts missing from a layer, layers with
            different expert counts, or a count that disagrees with the config.
    """
    per: dict[tuple[int, int], dict[str, list[tuple[int, str, str | None]]]] = {}
    fused: dict[int, dict[str, str]] = {}
    routed, shared, beyond = set(), set(), set()
    num_layers = getattr(config, "num_hidden_layers", None)
    for name in files.tensors:
        any_layer = _ANY_LAYER.match(name)
        if isinstance(num_layers, int) and any_layer and int(any_layer["layer"]) >= num_layers:
            beyond.add(name)
            continue
        if _SHARED.search(name):
            shared.add(name)
            continue
        m = _LAYER.match(name)
        if not m:
            continue
        layer, rest = int(m["layer"]), m["rest"]
        pe = _PER_EXPERT.match(rest)
        if pe:
            routed.add(name)
            if pe["scale"]:
                continue
            target, order = _GATE_UP[pe["w"]]
            scale = name + "_scale_inv"
            per.setdefault((layer, int(pe["e"])), {}).setdefault(target, []).append(
                (order, name, scale if scale in files.tensors else None))
            continue
        fu = _FUSED.match(rest)
        if fu:
            routed.add(name)
            fused.setdefault(layer, {})[fu["w"] + (fu["bias"] or "")] = name
    if per and fused:
        raise ModelError(f"{files.path}: experts stored both per expert and fused; moesz reads "
                         f"one layout per checkpoint")
    if per:
        experts, kind = _per_expert(files, per), "per-expert"
    elif fused:
        experts, kind = _fused(files, fused), "fused"
    else:
        arch = getattr(config, "model_type", "this")
        raise ModelError(f"{files.path}: no routed-expert tensors in the safetensors files of "
                         f"{arch} model; moesz needs a Mixture-of-Experts model (e.g. mixtral, "
                         f"qwen3_moe, deepseek_v3)")
    layers = sorted({layer for layer, _ in experts})
    counts = {layer: sum(1 for (la, _) in experts if la == layer) for layer in layers}
    for layer in layers:
        missing = [e for e in range(counts[layer]) if (layer, e) not in experts]
        if missing:
            raise ModelError(f"{files.path}: layer {layer} lacks expert {missing[0]}'s tensors; "
                             f"the checkpoint is incomplete — re-export it")
    if len(set(counts.values())) != 1:
        raise ModelError(f"{files.path}: MoE layers have different expert counts "
                         f"{sorted(set(counts.values()))}; moesz supports one routed-expert count "
                         f"per model")
    n = counts[layers[0]]
    declared = next((getattr(config, k) for k in _EXPERT_COUNT_KEYS
                     if isinstance(getattr(config, k, None), int)), None)
    if declared is not None and declared != n:
        raise ModelError(f"{files.path}: the files hold {n} experts per layer, config.json says "
                         f"{declared}; the checkpoint is incomplete or the config belongs to "
                         f"another model")
    return ExpertLayout(kind, tuple(layers), n, experts, frozenset(routed), frozenset(shared),
                        frozenset(beyond))


def _per_expert(files, per) -> dict[tuple[int, int], tuple[ExpertTensor, ...]]:
    out = {}
    for key, targets in per.items():
        tensors = []
        for target in TENSOR_ORDER:
            sources = sorted(targets.get(target, []))
            if not sources:
                continue
            if target == "gate_up_proj" and [o for o, _, _ in sources] != [0, 1]:
                raise ModelError(f"{files.path}: layer {key[0]} expert {key[1]} has "
                                 f"{'only the up' if sources[0][0] else 'only the gate'} "
                                 f"projection; the checkpoint is incomplete — re-export it")
            parts = tuple(_part(files, name, None, scale) for _, name, scale in sources)
            rows = sum(p.shape[0] for p in parts)
            tensors.append(ExpertTensor(target, (rows, *parts[0].shape[1:]), parts))
        if [t.name for t in tensors] != ["gate_up_proj", "down_proj"]:
            raise ModelError(f"{files.path}: layer {key[0]} expert {key[1]} lacks "
                             f"{'down' if tensors and tensors[0].name == 'gate_up_proj' else 'gate/up'}"
                             f" projection weights; the checkpoint is incomplete — re-export it")
        out[key] = tuple(tensors)
    return out


def _fused(files, fused) -> dict[tuple[int, int], tuple[ExpertTensor, ...]]:
    out = {}
    for layer, names in fused.items():
        mxfp4 = {w for w in ("gate_up_proj", "down_proj")
                 if f"{w}_blocks" in names or f"{w}_scales" in names}
        for w in mxfp4:
            if f"{w}_blocks" not in names or f"{w}_scales" not in names:
                have = "blocks" if f"{w}_blocks" in names else "scales"
                raise ModelError(f"{files.path}: layer {layer} has MXFP4 {w}_{have} without "
                                 f"{w}_{'scales' if have == 'blocks' else 'blocks'}; the "
                                 f"checkpoint is incomplete — re-export it")
        if any(w not in names and w not in mxfp4 for w in ("gate_up_proj", "down_proj")):
            raise ModelError(f"{files.path}: layer {layer} has fused experts "
                             f"{sorted(names)} but needs gate_up_proj and down_proj")
        first = names.get("gate_up_proj") or names["gate_up_proj_blocks"]
        count = files.info(first).shape[0]
        for e in range(count):
            tensors = []
            for target in TENSOR_ORDER:
                if target in mxfp4:
                    tensors.append(_mxfp4_tensor(files, target, names, e))
                elif target in names:
                    part = _part(files, names[target], e, None)
                    tensors.append(ExpertTensor(target, part.shape, (part,)))
            out[(layer, e)] = tuple(tensors)
    return out


def _mxfp4_tensor(files, target: str, names: dict[str, str], e: int) -> ExpertTensor:
    blocks = _part(files, names[f"{target}_blocks"], e, None)
    scales = _part(files, names[f"{target}_scales"], e, None)
    if blocks.dtype != "U8" or scales.dtype not in ("U8", "E8M0", "F8_E8M0") \
            or len(blocks.shape) != 3 or blocks.shape[2] != 16 \
            or tuple(scales.shape) != tuple(blocks.shape[:2]):
        raise ModelError(f"{files.path}: {names[f'{target}_blocks']} {blocks.dtype} "
                         f"{list(blocks.shape)} with scales {scales.dtype} {list(scales.shape)} is "
                         f"not gpt-oss MXFP4 (blocks uint8 [E, out, in/32, 16], scales uint8 "
                         f"[E, out, in/32])")
    out_dim, groups = blocks.shape[0], blocks.shape[1]
    # in memory (transformers) the matrix is [in, out]: gpt-oss's blocks run along `in`
    return ExpertTensor(target, (groups * 32, out_dim), (blocks, scales), "mxfp4")


def _part(files: CheckpointFiles, name: str, index: int | None, scale: str | None) -> Part:
    info = files.info(name)
    if index is None:
        return Part(name, info.file, info.offset, info.numel, info.dtype, info.shape, scale)
    if not info.shape or index >= info.shape[0]:
        raise ModelError(f"{files.path}: fused tensor {name} of shape {info.shape} has no expert "
                         f"{index}")
    sub = info.shape[1:]
    numel = math.prod(sub)
    size = ST_DTYPES[info.dtype][0]
    return Part(name, info.file, info.offset + index * numel * size, numel, info.dtype, sub, None)


def non_expert_name(name: str, architecture: str) -> str:
    """The in-memory (transformers 5) name of an on-disk non-expert tensor."""
    for pattern, repl in _RENAMES.get(architecture, ()):
        name = re.sub(pattern, repl, name)
    return name


def storage_dtype(st_dtype: str) -> str:
    """moesz's storage-format name of a safetensors dtype ("BF16" -> "bf16")."""
    return STORAGE_NAMES.get(st_dtype, st_dtype.lower())


def part_start(files: CheckpointFiles, part: Part) -> int:
    """The flat index of a part's first value within its on-disk tensor."""
    return (part.offset - files.info(part.tensor).offset) // ST_DTYPES[part.dtype][0]


def _read_part(files: CheckpointFiles, part: Part) -> torch.Tensor:
    """One part's values as a uint8 tensor of its shape (MXFP4 blocks or scales)."""
    raw = np.empty(part.numel, dtype=np.uint8)
    files.read(part.tensor, part_start(files, part), part.numel, raw)
    return torch.from_numpy(raw).reshape(part.shape)


def read_expert_tensor(files: CheckpointFiles, tensor: ExpertTensor,
                       fp8_to: torch.dtype = torch.float32) -> torch.Tensor:
    """One expert tensor read into memory: its parts' rows read straight into one buffer, in the
    stored dtype (FP8 e4m3 dequantized exactly by its block scales into `fp8_to`, as
    `load_model` does; gpt-oss MXFP4 dequantized exactly into bf16, as transformers does)."""
    from profiles.models.checkpoint import _dequant_blocks

    st = tensor.dtype
    if st == "MXFP4":
        from profiles.codecs.mxfp4 import decode_gpt_oss

        blocks, scales = (_read_part(files, part) for part in tensor.parts)
        return decode_gpt_oss(blocks, scales)
    if st == "F8_E5M2":
        raise ModelError(f"{files.path}: tensor {tensor.parts[0].tensor} is FP8 e5m2; moesz reads "
                         f"e4m3 only")
    raw = np.empty(tensor.numel, dtype=np.dtype(ST_DTYPES[st][1]))
    pos = 0
    for part in tensor.parts:
        files.read(part.tensor, part_start(files, part), part.numel, raw[pos: pos + part.numel])
        pos += part.numel
    out = torch.from_numpy(raw.view(np.uint8)).view(ST_DTYPES[st][2]).reshape(tensor.shape)
    if st != "F8_E4M3":
        return out
    rows, pieces = 0, []
    for part in tensor.parts:
        q = out[rows: rows + part.shape[0]]
        rows += part.shape[0]
        pieces.append(q.to(fp8_to) if part.scale is None
                      else _dequant_blocks(q, files.tensor(part.scale)).to(fp8_to))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
