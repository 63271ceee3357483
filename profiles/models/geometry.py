"""Model geometry: how many experts a MoE model has, how big each one is, and what else it holds.

A `ModelGeometry` is what the simulator and the planner need to know about a model without its
weights: the MoE layers, routed experts per layer, top-k, and the bytes of one routed expert in the
checkpoint's storage format. It is computed from module shapes (a model built on the `meta` device,
or a loaded one), never from parameter counts quoted elsewhere.

Storage formats (`dtype`) and what one value costs:

- `bf16`, `fp16`: 2 bytes; `fp32`: 4 bytes.
- `fp8_e4m3`: 1 byte per value plus one fp32 scale per 128 x 128 block of every 2-D weight (the
  DeepSeek-V3 block-quantized layout; the block comes from the checkpoint's `weight_block_size`).
- `mxfp4`: 4 bits per value plus one 1-byte E8M0 scale per 32 values (the OCP microscaling layout
  that gpt-oss ships its experts in); 1-D tensors (biases) stay bf16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

from profiles.errors import ModelError
from profiles.models.expert_map import ExpertMap, build_expert_map, expert_intermediate_size

DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3", "mxfp4")
QUANTIZED_DTYPES = ("fp8_e4m3", "mxfp4")
_PLAIN_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
                     "float8_e4m3fn": "fp8_e4m3"}


@dataclass(frozen=True)
class ModelGeometry:
    """Shapes and byte counts of a MoE model in its checkpoint storage format.

    `shared_expert_bytes` is the total over the whole model (all MoE layers); `non_expert_bytes`
    is everything that is not a routed expert (it includes the shared experts, routers, attention,
    norms and embeddings).
    """

    name: str
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]
    experts_per_layer: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    dtype: str
    bytes_per_expert: int
    expert_tensor_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    shared_expert_bytes: int
    non_expert_bytes: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @property
    def num_routed_experts(self) -> int:
        """Routed experts over the whole model."""
        return len(self.moe_layers) * self.experts_per_layer

    @property
    def routed_expert_bytes(self) -> int:
        """Bytes of all routed experts together, checkpoint format."""
        return self.num_routed_experts * self.bytes_per_expert

    @property
    def total_bytes(self) -> int:
        return self.routed_expert_bytes + self.non_expert_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["expert_tensor_shapes"] = {n: list(s) for n, s in self.expert_tensor_shapes}
        d["routed_expert_bytes"] = self.routed_expert_bytes
        return d


def check_dtype(dtype: str, what: str = "dtype") -> str:
    """Return `dtype` if it is a known storage format, else raise ModelError naming the choices."""
    dtype = TORCH_DTYPE_NAMES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ModelError(f"{what} {dtype!r} is not a storage format moesz knows; "
                         f"choose one of {', '.join(DTYPES)}")
    return dtype


def tensor_storage_bytes(shape: Iterable[int], dtype: str,
                         fp8_block: tuple[int, int] | None = (128, 128)) -> int:
    """Bytes one tensor occupies in storage format `dtype`, scales included.

    Args:
        shape: the tensor's shape (any orientation; block scales are counted over the last two
            dimensions).
        dtype: one of `DTYPES`.
        fp8_block: the (rows, cols) block of an `fp8_e4m3` checkpoint's fp32 scales; None for a
            scale-free FP8 tensor.

    Returns:
        The byte count, rounded up to whole bytes.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if dtype in _PLAIN_BYTES:
        return numel * _PLAIN_BYTES[dtype]
    if len(shape) < 2:  # biases and norms stay in bf16 in quantized checkpoints
        return numel * 2
    if dtype == "fp8_e4m3":
        if fp8_block is None:
            return numel
        rows, cols = shape[-2], shape[-1]
        lead = math.prod(shape[:-2])
        scales = lead * math.ceil(rows / fp8_block[0]) * math.ceil(cols / fp8_block[1])
        return numel + 4 * scales  # 1 byte per e4m3 value + one fp32 scale per block
    if dtype == "mxfp4":
        return math.ceil(numel / 2) + math.ceil(numel / 32)  # 4-bit values + 1 E8M0 byte per 32
    raise ModelError(f"dtype {dtype!r} is not a storage format moesz knows; "
                     f"choose one of {', '.join(DTYPES)}")


def geometry_from_model(model, name: str, dtype: str, fp8_block: tuple[int, int] | None = None,
                        checkpoint_bytes: int | None = None,
                        emap: ExpertMap | None = None) -> ModelGeometry:
    """The geometry of a model built on `meta` or loaded, its experts counted in `dtype`.

    Args:
        model: a transformers causal LM (weights or `meta`).
        name: the spec it came from.
        dtype: storage format of the routed experts (see the module docstring).
        fp8_block: the FP8 scale block, for `fp8_e4m3`.
        checkpoint_bytes: all tensor bytes of the checkpoint files, when there are files; the
            non-expert bytes are then what the files hold besides the routed experts.
        emap: the model's expert map, if already built.

    Raises:
        ModelError: the model has no routed experts.
    """
    emap = emap or build_expert_map(model, name)
    if not emap.experts:
        raise ModelError(f"{name}: the model has no routed experts; moesz plans for MoE models")
    if emap.top_k > emap.experts_per_layer:
        raise ModelError(f"{name}: routes top-{emap.top_k} of {emap.experts_per_layer} experts per "
                         f"layer; top-k must not exceed the experts (check num_experts_per_tok)")
    config = model.config
    per_expert = sum(tensor_storage_bytes(t.shape, dtype, fp8_block)
                     for t in emap.experts[0].tensors.values())
    routed = per_expert * len(emap.experts)
    # shared experts are stored like the routed ones in FP8 checkpoints (DeepSeek-V3 quantizes
    # every linear layer) and in bf16 next to MXFP4 experts (gpt-oss quantizes experts only)
    shared_dtype = "bf16" if dtype == "mxfp4" else dtype
    shared = sum(tensor_storage_bytes(t.shape, shared_dtype, fp8_block)
                 for tensors in emap.shared_experts.values() for t in tensors.values())
    if checkpoint_bytes is not None:
        non_expert = checkpoint_bytes - routed
    else:
        # the meta model is built in `dtype` (bf16 for quantized formats); tensors an architecture
        # keeps in fp32 (DeepSeek's router) count 4 bytes per value
        routed_ids = {id(p) for mod in emap.expert_modules.values() for p in mod.parameters()}
        everything = sum(t.numel() * t.element_size()
                         for t in _stored_tensors(model) if id(t) not in routed_ids)
        shared_plain = sum(t.numel() * t.element_size()
                           for ts in emap.shared_experts.values() for t in ts.values())
        non_expert = everything - shared_plain + shared
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    return ModelGeometry(
        name=name, architecture=config.model_type, num_layers=emap.num_layers,
        moe_layers=emap.moe_layers, experts_per_layer=emap.experts_per_layer, top_k=emap.top_k,
        hidden_size=hidden, expert_intermediate_size=expert_intermediate_size(emap, hidden, config),
        dtype=dtype, bytes_per_expert=per_expert, expert_tensor_shapes=emap.expert_tensor_shapes,
        shared_expert_bytes=shared, non_expert_bytes=non_expert, num_attention_heads=heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0)),
        vocab_size=int(getattr(config, "vocab_size", 0) or 0))


def _stored_tensors(model):
    """Every parameter once (tied weights count once) and every persistent buffer."""
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p
    for mod in model.modules():
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                yield b


def geometry_from_files(files, layout, config, name: str, dtype: str,
                        fp8_block: tuple[int, int] | None = None) -> ModelGeometry:
    """The geometry of a checkpoint from its config and safetensors headers, building nothing.

    Gives the same `ModelGeometry` as `geometry_from_model` on the loaded model: expert shapes are
    the in-memory ones (`profiles.models.layout`), non-expert bytes what the files hold besides the
    routed experts.

    Args:
        files: the opened `profiles.models.files.CheckpointFiles`.
        layout: its `profiles.models.layout.ExpertLayout`.
        config: the transformers config read from config.json.
        name: the spec it came from.
        dtype: storage format of the routed experts.
        fp8_block: the FP8 scale block, for `fp8_e4m3`.

    Raises:
        ModelError: no top-k in the config, or top-k above the expert count.
    """
    from profiles.models.expert_map import _TOPK_KEYS

    top_k = next((getattr(config, k) for k in _TOPK_KEYS if getattr(config, k, None)), None)
    if not top_k:
        raise ModelError(f"{name}: the {config.model_type} config gives no top-k "
                         f"(num_experts_per_tok is unset); set num_experts_per_tok=N")
    if top_k > layout.experts_per_layer:
        raise ModelError(f"{name}: routes top-{top_k} of {layout.experts_per_layer} experts per "
                         f"layer; top-k must not exceed the experts (check num_experts_per_tok)")
    shapes = layout.tensor_shapes
    first = layout.experts[(layout.moe_layers[0], 0)]
    packed = any(t.format == "mxfp4" for t in first)
    if packed != (dtype == "mxfp4"):
        held = "MXFP4 *_blocks/*_scales" if packed else f"{first[0].dtype} values"
        said = ("quantization_config mxfp4" if dtype == "mxfp4" else
                "no MXFP4 quantization_config")
        raise ModelError(f"{name}: config.json has {said}, but the expert tensors in the files "
                         f"are {held}; config.json belongs to another export of the model — "
                         f"restore the checkpoint's own")
    if packed:  # gpt-oss: the blocks, scales and biases as shipped
        per_expert = sum(t.stored_bytes for t in first)
    else:
        per_expert = sum(tensor_storage_bytes(s, dtype, fp8_block) for _, s in shapes)
    routed = per_expert * len(layout.experts)
    shared = sum(files.tensors[n].nbytes for n in layout.shared)
    hidden = int(config.hidden_size)
    down = dict(shapes).get("down_proj")
    if down is not None and len(down) == 2 and hidden not in down:
        raise ModelError(f"{name}: config.json says hidden_size {hidden}, but the experts' "
                         f"down_proj in the files is {down[0]}x{down[1]}; config.json belongs to "
                         f"another model or was edited — restore the checkpoint's own")
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    num_layers = int(getattr(config, "num_hidden_layers", 0) or max(layout.moe_layers) + 1)
    return ModelGeometry(
        name=name, architecture=config.model_type, num_layers=num_layers,
        moe_layers=layout.moe_layers, experts_per_layer=layout.experts_per_layer,
        top_k=int(top_k), hidden_size=hidden,
        expert_intermediate_size=_intermediate(shapes, hidden, config), dtype=dtype,
        bytes_per_expert=per_expert, expert_tensor_shapes=shapes, shared_expert_bytes=shared,
        non_expert_bytes=files.total_bytes - routed, num_attention_heads=heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0)),
        vocab_size=int(getattr(config, "vocab_size", 0) or 0))


def _intermediate(shapes, hidden: int, config) -> int:
    for name, shape in shapes:
        if name == "down_proj" and len(shape) == 2:
            other = [d for d in shape if d != hidden]
            return other[0] if other else hidden
    for key in ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ModelError(f"cannot tell the experts' FFN width: no down projection among "
                     f"{[n for n, _ in shapes]}")
