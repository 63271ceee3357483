"""Matrix kinds of a routed expert: which projection each of its tensors belongs to.

Every MoE expert is a gated FFN, down(act(gate(x)) * up(x)). transformers 5 fuses gate and up in
memory (`gate_up_proj`) and `profiles.models.layout` maps every on-disk layout to that fused form,
so two kinds cover every architecture: `gate_up` and `down`. A policy may also name `gate` and
`up`, each falling back to `gate_up` when not named: models whose experts stay one module per
expert in memory (older or remote-code models: mixtral's `w1/w2/w3`, the
`gate_proj/up_proj/down_proj` of qwen-style modules) have them as separate tensors, and on fused
models an expert whose gate or up is stored apart from `gate_up` has its `gate_up_proj` split into
its gate and up parts, each stored as its own blob and joined back exactly, following the
architecture's order (`profiles.models.gate_up`: halves for most, interleaved for gpt_oss).

Biases follow their matrix (`gate_up_proj_bias` is `gate_up`). Per-matrix storage follows the
observation that the down projection carries most of the quantization damage of MoE experts and
is the heavier-tailed matrix (issue 17; see docs/policy.md).
"""

from __future__ import annotations

from profiles.errors import PolicyError

FUSED_KINDS = ("gate_up", "down")
KINDS = ("gate_up", "down", "gate", "up")
# the base of a tensor name (before the first "." and without a `_bias` suffix) -> its kind
_BASE_KIND = {"gate_up_proj": "gate_up", "down_proj": "down", "w2": "down",
              "w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}


def matrix_of(tensor_name: str) -> str:
    """The matrix kind of an expert tensor: `gate_up`, `down`, `gate` or `up`.

    Raises:
        PolicyError: the name is none of the expert tensors moesz knows.
    """
    base = tensor_name.split(".")[0]
    base = base[:-5] if base.endswith("_bias") else base
    kind = _BASE_KIND.get(base)
    if kind is None:
        raise PolicyError(f"expert tensor {tensor_name!r} belongs to no known matrix; known: "
                          f"{', '.join(sorted(_BASE_KIND))}")
    return kind


def lookup_order(kind: str) -> tuple[str, ...]:
    """The matrix names a policy level is searched for, most specific first."""
    return (kind, "gate_up") if kind in ("gate", "up") else (kind,)


def check_kind(name: str, where: str) -> str:
    """`name` if it is a matrix kind; else PolicyError with the valid names."""
    if name not in KINDS:
        raise PolicyError(f"{where}: unknown matrix {name!r}; valid matrices: {', '.join(KINDS)} "
                          f"(gate and up: the two parts of gate_up)")
    return name


def model_kinds(tensor_names) -> tuple[str, ...]:
    """The matrix kinds a model's expert tensors have, in KINDS order."""
    have = {matrix_of(n) for n in tensor_names}
    return tuple(k for k in KINDS if k in have)


def matrix_values(expert_tensor_shapes, split: bool = False) -> dict[str, int]:
    """Values of one expert per matrix kind, from its (name, shape) pairs (biases included).
    With `split`, a fused `gate_up` counts as its halves, `gate` and `up` (as stored apart)."""
    import math

    out: dict[str, int] = {}
    for name, shape in expert_tensor_shapes:
        kind = matrix_of(name)
        out[kind] = out.get(kind, 0) + math.prod(shape)
    if split and "gate_up" in out:
        half = out.pop("gate_up") // 2
        out = {"gate": half, "up": half, **out}
    return out
