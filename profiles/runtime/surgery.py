"""Model surgery for the runtime: swap each MoE layer's experts module for a weightless stand-in,
build the one-expert "shells" that compute an expert, and hook the decoder layers for timing.

transformers 5 keeps a layer's routed experts in one fused module (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I], biases for gpt-oss) whose `forward(hidden, top_k_index, top_k_weights)` is
called by the MoE block after its router. The stand-in (`OffloadedExperts`) has that signature and
hands the call to the runtime. A shell is a shallow copy of the original module with its per-expert
parameters removed and `num_experts = 1`: given one expert's tensors as buffers, its own forward
computes that expert exactly as the model would (activation, clamping, biases,
`_experts_implementation`), so every fused-experts architecture works without per-architecture
code.
"""

from __future__ import annotations

import copy
import re
from typing import Callable

from torch import nn

from profiles.errors import ModelError


class OffloadedExperts(nn.Module):
    """Stands in for a layer's experts module; holds no weights."""

    def __init__(self, runtime, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self._runtime = [runtime]  # a list: not registered as a submodule

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self._runtime[0].moe_forward(self.layer, hidden_states, top_k_index, top_k_weights)


def make_shell(module: nn.Module, expert_names: set[str]) -> nn.Module:
    """A weightless one-expert copy of `module`; weights are set per call as buffers."""
    shell = copy.copy(module)
    object.__setattr__(shell, "_parameters",
                       {n: p for n, p in module._parameters.items() if n not in expert_names})
    object.__setattr__(shell, "_buffers", dict(module._buffers))
    object.__setattr__(shell, "_modules", dict(module._modules))
    if hasattr(shell, "num_experts"):
        object.__setattr__(shell, "num_experts", 1)
    return shell


def swap_experts(model: nn.Module, expert_map, runtime) -> tuple[dict, dict]:
    """Replace every experts module by an `OffloadedExperts`; returns (shells, originals) by layer.

    Raises:
        ModelError: a layer keeps its experts in an `nn.ModuleList` (remote-code layouts).
    """
    names = {id(m): n for n, m in model.named_modules()}
    shells, originals = {}, {}
    for layer, mod in expert_map.expert_modules.items():
        if isinstance(mod, nn.ModuleList):
            raise ModelError(f"layer {layer}: experts are an nn.ModuleList (remote-code layout); "
                             f"the runtime serves transformers' fused experts modules")
        shells[layer] = make_shell(mod, set(expert_map.get(layer, 0).tensors))
        parent_name, _, attr = names[id(mod)].rpartition(".")
        originals[layer] = mod
        setattr(model.get_submodule(parent_name), attr, OffloadedExperts(runtime, layer))
    return shells, originals


def restore_experts(model: nn.Module, originals: dict[int, nn.Module]) -> None:
    """Put back the experts modules `swap_experts` replaced."""
    names = {id(m): n for n, m in model.named_modules()}
    for mod in list(model.modules()):
        if isinstance(mod, OffloadedExperts) and mod.layer in originals:
            parent_name, _, attr = names[id(mod)].rpartition(".")
            setattr(model.get_submodule(parent_name), attr, originals[mod.layer])


def timing_hooks(model: nn.Module, expert_map, begin: Callable[[int], None],
                 end: Callable[[int], None]) -> list:
    """Call `begin(i)` when decoder layer i starts and `end(i)` when a dense one ends (MoE layers
    end their non-expert part when the experts are called); -1 for the LM head."""
    moe = tuple(expert_map.moe_layers)
    m = re.match(rf"^(.*)\.{moe[0]}(\..*)?$", expert_map.block_names[moe[0]])
    if m is None:
        return []
    hooks = []
    for i, layer_mod in enumerate(model.get_submodule(m.group(1))):
        hooks.append(layer_mod.register_forward_pre_hook(lambda mod, args, i=i: begin(i)))
        if i not in moe:
            hooks.append(layer_mod.register_forward_hook(lambda mod, args, out, i=i: end(i)))
    head = model.get_output_embeddings()
    if head is not None:
        hooks.append(head.register_forward_pre_hook(lambda mod, args: begin(-1)))
        hooks.append(head.register_forward_hook(lambda mod, args, out: end(-1)))
    return hooks
