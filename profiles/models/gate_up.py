"""Where gate and up sit inside a fused `gate_up_proj`, per architecture: split and join exactly.

transformers 5 fuses each expert's gate and up projections into one tensor (`profiles.models.
layout` maps every on-disk layout to it), and each architecture's experts forward takes them apart
its own way (checked against transformers 5 `models/*/modeling_*.py`):

| architecture | expert tensor | gate, up |
|---|---|---|
| mixtral, phimoe, minimax, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 | [2I, H] (out, in) | `linear(x, W).chunk(2, dim=-1)`: gate rows first, then up rows |
| llama4 | [H, 2I] (in, out) | `(x @ W).chunk(2, dim=-1)`: gate columns first, then up columns |
| gpt_oss | [H, 2I] (in, out), bias [2I] | `gate_up[..., ::2]`, `gate_up[..., 1::2]`: interleaved columns, bias likewise |

So the 2I axis is the output axis of the weight (rows, or columns when stored [in, out]) and the
only axis of the bias, and gate and up are its two halves or its even and odd positions. A policy
that stores `gate` and `up` differently (`profiles.matrices`) has each part encoded as its own blob
(`gate_proj`, `up_proj`, and `gate_proj_bias`, `up_proj_bias`), and the decoded parts are joined
back into `gate_up_proj` bit for bit before the model computes with them. On a per-expert checkpoint
(mixtral's `w1`/`w3`, qwen's `gate_proj`/`up_proj`) the parts are exactly the tensors on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from profiles.errors import PolicyError

# fused tensor -> (gate part, up part), as blobs are named
PARTS = {"gate_up_proj": ("gate_proj", "up_proj"),
         "gate_up_proj_bias": ("gate_proj_bias", "up_proj_bias")}
_FUSED_OF = {part: (fused, i) for fused, pair in PARTS.items() for i, part in enumerate(pair)}


@dataclass(frozen=True)
class GateUpLayout:
    """How one architecture orders gate and up along the 2I axis of `gate_up_proj`.

    Attributes:
        architecture: the transformers model type.
        transposed: the weight is stored [in, out] ([H, 2I]), so the 2I axis is its last.
        interleaved: gate and up alternate (gate at even positions); else gate is the first half.
    """

    architecture: str
    transposed: bool
    interleaved: bool

    def axis(self, name: str) -> int:
        """The 2I axis of fused tensor `name` (negative: counted from the end)."""
        return -1 if name.endswith("_bias") or self.transposed else -2

    def split(self, name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) views of fused tensor `name`."""
        axis = self.axis(name)
        if self.interleaved:
            pairs = t.unflatten(axis, (-1, 2))       # [.., I, 2, ..]: the 2 sits at `axis`
            return pairs.select(axis, 0), pairs.select(axis, 1)
        half = t.shape[axis] // 2
        return t.narrow(axis, 0, half), t.narrow(axis, half, half)

    def join(self, name: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The fused tensor `name` from its gate and up parts (a new tensor; values copied)."""
        axis = self.axis(name)
        if self.interleaved:
            return torch.stack((gate, up), dim=axis).flatten(axis - 1, axis)
        return torch.cat((gate, up), dim=axis)


_HALVES = ("mixtral", "phimoe", "minimax", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
           "deepseek_v3")
LAYOUTS = {**{a: GateUpLayout(a, False, False) for a in _HALVES},
           "llama4": GateUpLayout("llama4", True, False),
           "llama4_text": GateUpLayout("llama4_text", True, False),
           "gpt_oss": GateUpLayout("gpt_oss", True, True)}


def gate_up_layout(architecture: str | None) -> GateUpLayout | None:
    """The architecture's layout, or None where moesz does not know it."""
    return LAYOUTS.get(str(architecture))


def require_layout(architecture: str | None, where: str = "policy") -> GateUpLayout:
    """The architecture's layout; PolicyError (one line, the known architectures) if unknown."""
    layout = gate_up_layout(architecture)
    if layout is None:
        raise PolicyError(f"{where} names matrix 'gate' or 'up', but moesz does not know how a "
                          f"{architecture} model orders gate and up inside its fused gate_up_proj "
                          f"(known: {', '.join(sorted(LAYOUTS))}); use 'gate_up'")
    return layout


def split_expert(tensors: dict[str, torch.Tensor], layout: GateUpLayout
                 ) -> dict[str, torch.Tensor]:
    """An expert's tensors with each fused gate/up tensor replaced by its two parts (contiguous
    copies, gate first), the others as they are, in the original order."""
    out = {}
    for name, t in tensors.items():
        if name in PARTS:
            gate, up = layout.split(name, t)
            out[PARTS[name][0]], out[PARTS[name][1]] = gate.contiguous(), up.contiguous()
        else:
            out[name] = t
    return out


def join_expert(tensors: dict[str, torch.Tensor], layout: GateUpLayout | None
                ) -> dict[str, torch.Tensor]:
    """`split_expert` undone: gate and up parts joined back into their fused tensors (the dict
    itself when it holds no parts).

    Raises:
        PolicyError: parts without a layout to join them with.
    """
    if not any(name in _FUSED_OF for name in tensors):
        return tensors
    if layout is None:
        raise PolicyError("an expert record holds gate and up as separate blobs but the model's "
                          "architecture gives no way to join them; repack with 'gate_up'")
    out = {}
    for name, t in tensors.items():
        fused, i = _FUSED_OF.get(name, (None, 0))
        if fused is None:
            out[name] = t
        elif i == 0:
            out[fused] = layout.join(fused, t, tensors[PARTS[fused][1]])
    return out
