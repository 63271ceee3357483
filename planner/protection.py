"""Which matrices a plan protects: the summary line `moesz plan` and `plan show` print (issue 17).

Derived from the plan's policy alone, layer by layer: a matrix is protected at a layer where it
is stored more exactly than another matrix of the same layer — bit-exact (raw, lossless) beside a
lossy one, or the same codec and bound mode at a smaller bound. Specs that cannot be ranked (two
different lossy codecs) are listed, not ranked. The matrices are `gate_up` and `down`, or `gate`,
`up` and `down` when the policy stores gate and up apart (`profiles.matrices`).
"""

from __future__ import annotations

from typing import Sequence

from profiles.policy import Policy, StorageSpec

EXACT = ("raw", "lossless")


def tighter(a: StorageSpec, b: StorageSpec) -> bool:
    """Whether `a` stores a matrix more exactly than `b` (False where they cannot be ranked)."""
    if a.codec in EXACT or b.codec in EXACT:
        return a.codec in EXACT and b.codec not in EXACT
    return (a.error_bounded and b.error_bounded and a.codec == b.codec and a.mode == b.mode
            and dict(a.codec_options) == dict(b.codec_options) and a.level < b.level)


def matrix_summary(policy: Policy, moe_layers: Sequence[int]) -> str:
    """One line: which matrices the policy protects where, and how it stores the rest, e.g.
    `protects: down on layers 2, 5 (raw); compresses gate_up everywhere at szp:meanabs:2`.

    Args:
        policy: the plan's policy (layer-level entries; per-expert entries are not summarized).
        moe_layers: the model's MoE layers.
    """
    from profiles.models.expert_map import format_ranges

    named = {k for _, _, k in policy.matrices}
    kinds = ("gate", "up", "down") if named & {"gate", "up"} else ("gate_up", "down")
    layers = list(moe_layers)
    spec = {(lay, k): policy.level_spec(lay, None, k) for lay in layers for k in kinds}
    protected: dict[tuple[str, StorageSpec], list[int]] = {}
    for lay in layers:
        for k in kinds:
            if any(tighter(spec[(lay, k)], spec[(lay, o)]) for o in kinds if o != k):
                protected.setdefault((k, spec[(lay, k)]), []).append(lay)

    def where(lays: list[int]) -> str:
        return f"layer{'s' if len(lays) > 1 else ''} {format_ranges(lays)}"

    def how(s: StorageSpec) -> str:
        return "raw" if s.codec == "raw" else f"at {s.describe()}"

    parts = [f"{k} on {where(lays)} ({s.describe()})" for (k, s), lays in protected.items()]
    alike = all(len({spec[(lay, k)] for k in kinds}) == 1 for lay in layers)
    head = "protects: " + ("; ".join(parts) if parts else
                           "no matrix (each layer stores its matrices alike)" if alike else
                           "no matrix (where a layer's matrices differ, their specs cannot be "
                           "ranked: different lossy codecs, or raw beside lossless)")
    rest = []
    for k in kinds:
        left = [lay for lay in layers if not any(lay in lays for (kk, _), lays in
                                                  protected.items() if kk == k)]
        groups: dict[StorageSpec, list[int]] = {}
        for lay in left:
            groups.setdefault(spec[(lay, k)], []).append(lay)
        if len(groups) == 1:
            s = next(iter(groups))
            scope = "everywhere" if len(left) == len(layers) else f"on {where(left)}"
            verb = "keeps" if s.codec == "raw" else "compresses"
            rest.append(f"{verb} {k} {scope} {how(s)}" if s.codec != "raw"
                        else f"keeps {k} raw {scope}")
        elif groups:
            rest.append(f"{k}: " + ", ".join(f"{how(s)} on {where(lays)}"
                                             for s, lays in groups.items()))
    return "; ".join([head] + rest)
