"""Find the routed experts, shared experts, routers and dense layers of a transformers MoE model.

transformers 5 stores the routed experts of mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
deepseek_v3, gpt_oss and phimoe as fused 3-D parameters on an `experts` module
(`gate_up_proj` [experts, 2*I, H] and `down_proj` [experts, H, I]; gpt_oss stores them
transposed, [experts, H, 2*I] and [experts, I, H], with per-expert biases). Older and remote-code
models keep one module per expert in an `nn.ModuleList`. Both are mapped here to per-expert
tensors that are VIEWS of the model's storage: writing into `ExpertRef.tensors[name]` under
`torch.no_grad()` changes the model, and nothing is copied.

The map is found structurally (a decoder-layer list whose blocks own an `experts` child), so other
MoE architectures with the same shape work too; the listed ones are tested on tiny random configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from profiles.errors import ModelError

_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_expert_gate")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k")


@dataclass(frozen=True)
class ExpertRef:
    """One routed expert: its layer, index and tensors (views into the model's parameters)."""

    layer: int
    expert: int
    tensors: dict[str, torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


@dataclass
class ExpertMap:
    """Where a model's experts live.

    Attributes:
        experts: every routed expert, ordered by (layer, expert).
        moe_layers: indices of decoder layers with routed experts.
        shared_experts: layer -> {name: tensor} of always-active shared experts (and their gates).
        routers: layer -> router module (its forward hook sees the routing decisions).
        dense_layers: indices of decoder layers with a plain feed-forward block.
        num_layers: all decoder layers.
        experts_per_layer: routed experts in each MoE layer.
        top_k: experts each token is routed to.
        transposed: layer -> True when fused weights are stored [experts, in, out] (gpt_oss).
        block_names: layer -> qualified name of the MoE block, e.g. "model.layers.3.mlp".
        expert_modules: layer -> the module that owns the routed experts' parameters.
    """

    experts: list[ExpertRef]
    moe_layers: tuple[int, ...]
    shared_experts: dict[int, dict[str, torch.Tensor]]
    routers: dict[int, nn.Module]
    dense_layers: tuple[int, ...]
    num_layers: int
    experts_per_layer: int
    top_k: int
    transposed: dict[int, bool] = field(default_factory=dict)
    block_names: dict[int, str] = field(default_factory=dict)
    expert_modules: dict[int, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {(r.layer, r.expert): r for r in self.experts}

    def get(self, layer: int, expert: int) -> ExpertRef:
        """The expert `expert` of layer `layer`; ModelError if there is none."""
        try:
            return self._index[(layer, expert)]
        except KeyError:
            last = self.experts_per_layer - 1
            raise ModelError(f"layer {layer} expert {expert} does not exist; MoE layers are "
                             f"{format_ranges(self.moe_layers)}, experts 0-{last}") from None

    def layer_experts(self, layer: int) -> list[ExpertRef]:
        return [r for r in self.experts if r.layer == layer]

    @property
    def expert_tensor_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of one routed expert's tensors, as stored."""
        first = self.experts[0]
        return tuple((n, tuple(t.shape)) for n, t in first.tensors.items())


def build_expert_map(model: nn.Module, name: str = "model") -> ExpertMap:
    """Map the experts of a transformers causal LM (weighted or on the `meta` device).

    Args:
        model: a transformers `PreTrainedModel` (or any module with a decoder-layer list).
        name: how the model is called in error messages.

    Returns:
        The `ExpertMap`; its tensors are views of the model's parameters.

    Raises:
        ModelError: the model has no routed-expert layers, or its top-k cannot be read.
    """
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", type(model).__name__)
    layers_name, layers = _decoder_layers(model, config)
    experts: list[ExpertRef] = []
    moe_layers, dense_layers = [], []
    shared: dict[int, dict[str, torch.Tensor]] = {}
    routers: dict[int, nn.Module] = {}
    transposed: dict[int, bool] = {}
    block_names: dict[int, str] = {}
    expert_modules: dict[int, nn.Module] = {}
    counts, top_k = set(), None
    hidden = getattr(config, "hidden_size", None)
    for i, layer in enumerate(layers):
        found = _moe_block(layer)
        if found is None:
            dense_layers.append(i)
            continue
        child_name, block = found
        refs, is_t = _split_experts(block.experts, i, hidden)
        experts.extend(refs)
        counts.add(len(refs))
        moe_layers.append(i)
        transposed[i] = is_t
        expert_modules[i] = block.experts
        block_names[i] = f"{layers_name}.{i}" + (f".{child_name}" if child_name else "")
        for rname in _ROUTER_NAMES:
            router = getattr(block, rname, None)
            if isinstance(router, nn.Module):
                routers[i] = router
                top_k = top_k or getattr(router, "top_k", None)
                break
        top_k = top_k or getattr(block, "top_k", None)
        tensors = {}
        for sname in _SHARED_NAMES:
            sub = getattr(block, sname, None)
            if isinstance(sub, nn.Module):
                tensors.update({f"{sname}.{n}": p.detach() for n, p in sub.named_parameters()})
        if tensors:
            shared[i] = tensors
    if not moe_layers:
        raise ModelError(f"{name}: no routed-expert layers found in this {arch} model; moesz needs "
                         f"a Mixture-of-Experts model (e.g. mixtral, qwen3_moe, deepseek_v3)")
    if len(counts) != 1:
        raise ModelError(f"{name}: MoE layers have different expert counts {sorted(counts)}; "
                         f"moesz supports one routed-expert count per model")
    for key in _TOPK_KEYS:
        top_k = top_k or getattr(config, key, None)
    if not top_k:
        raise ModelError(f"{name}: the {arch} config gives no top-k (num_experts_per_tok is "
                         f"unset); set num_experts_per_tok=N")
    return ExpertMap(experts=experts, moe_layers=tuple(moe_layers), shared_experts=shared,
                     routers=routers, dense_layers=tuple(dense_layers), num_layers=len(layers),
                     experts_per_layer=counts.pop(), top_k=int(top_k), transposed=transposed,
                     block_names=block_names, expert_modules=expert_modules)


def _decoder_layers(model: nn.Module, config) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: a ModuleList named `*layers` of num_hidden_layers blocks."""
    n = getattr(config, "num_hidden_layers", None)
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    for name, mod in candidates:
        if name.split(".")[-1] in ("layers", "h", "blocks") and (n is None or len(mod) == n):
            return name, mod
    if candidates:
        return max(candidates, key=lambda c: len(c[1]))
    raise ModelError(f"{type(model).__name__}: no decoder-layer list found; expected a "
                     f"transformers causal LM")


def _moe_block(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The child of a decoder layer that owns the routed experts, or None for a dense layer."""
    if _has_experts(layer):
        return "", layer
    for child_name, child in layer.named_children():
        if _has_experts(child):
            return child_name, child
    return None


def _has_experts(mod: nn.Module) -> bool:
    experts = getattr(mod, "experts", None)
    if isinstance(experts, nn.ModuleList):
        return len(experts) > 0
    return isinstance(experts, nn.Module) and any(p.ndim >= 3 for p in experts.parameters(False))


def _split_experts(experts: nn.Module, layer: int, hidden: int | None
                   ) -> tuple[list[ExpertRef], bool]:
    """Per-expert views of one layer's experts, and whether fused weights are [E, in, out]."""
    if isinstance(experts, nn.ModuleList):
        refs = [ExpertRef(layer, e, {n: p.detach() for n, p in mod.named_parameters()})
                for e, mod in enumerate(experts)]
        return refs, False
    fused = {n: p for n, p in experts.named_parameters(recurse=False) if p.ndim >= 3}
    num = next(iter(fused.values())).shape[0]
    per_expert = {n: p for n, p in experts.named_parameters(recurse=False)
                  if p.ndim >= 2 and p.shape[0] == num}
    refs = [ExpertRef(layer, e, {n: p.detach()[e] for n, p in per_expert.items()})
            for e in range(num)]
    return refs, _is_transposed(experts, fused, hidden)


def _is_transposed(experts: nn.Module, fused: dict[str, torch.Tensor], hidden: int | None) -> bool:
    flag = getattr(experts, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    down = fused.get("down_proj")
    if down is not None and hidden is not None:
        return down.shape[-1] == hidden and down.shape[-2] != hidden  # [E, I, H] is [E, in, out]
    return False


def expert_intermediate_size(expert_map: ExpertMap, hidden: int, config=None) -> int:
    """The routed experts' FFN width I, read from the down projection's shape."""
    for name, shape in expert_map.expert_tensor_shapes:
        base = name.split(".")[0]
        if base in ("down_proj", "w2") and len(shape) == 2:
            other = [d for d in shape if d != hidden]
            return other[0] if other else hidden
    for key in ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ModelError("cannot tell the experts' FFN width: no down projection among "
                     f"{[n for n, _ in expert_map.expert_tensor_shapes]}")


def format_ranges(values) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    values = sorted(values)
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
