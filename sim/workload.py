"""Turn routing traces into the steps the simulator replays.

A batch of `batch_size` sequences is prefilled in one step (every prompt token of every
sequence), then decoded `generated_tokens` steps; at each step and MoE layer the batch needs the
union of its tokens' experts, each with the number of tokens routed to it. Sequence slot `i`
replays prompts `i, i + B, i + 2B, ...` of the trace back to back; when the trace runs out the
replay cycles, and the workload says so in `notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from profiles.errors import ProfileError
from sim.synthetic import TRACE_COLUMNS

LayerExperts = tuple[tuple[int, ...], tuple[int, ...]]  # (experts, tokens routed to each)


@dataclass(frozen=True)
class Step:
    """One forward pass of the batch: `tokens` tokens at context length `context` each."""

    phase: str  # "prefill" or "decode"
    tokens: int  # tokens processed in this pass (batch * prompt for prefill, batch for decode)
    context: int  # context length per sequence at the end of the pass
    layers: tuple[LayerExperts, ...]  # per MoE layer (position in moe_layers)


@dataclass(frozen=True)
class Workload:
    moe_layers: tuple[int, ...]
    experts_per_layer: int
    batch_size: int
    prompt_tokens: int
    steps: tuple[Step, ...]
    decode_counts: np.ndarray = field(repr=False)  # [moe layer, expert] decode activations
    source: str = ""
    notes: tuple[str, ...] = ()
    placement_counts: np.ndarray | None = field(default=None, repr=False)  # [layer, expert]
    placement_source: str = ""  # where placement_counts came from ("" = the replayed traces)

    @property
    def decode_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.phase == "decode")

    def hot_order(self) -> list[tuple[int, int]]:
        """(layer position, expert) by decode activations, most first; ties by position.

        The activations are the placement traces' when the workload has them
        (`with_placement`), else the replayed traces' own — an oracle: static placements then
        know the workload they are measured on."""
        counts = self.decode_counts if self.placement_counts is None else self.placement_counts
        flat = np.lexsort((np.arange(counts.size), -counts.ravel()))
        E = counts.shape[1]
        return [(int(i // E), int(i % E)) for i in flat]


def _token_matrix(df: pd.DataFrame, L: int, k: int, where: str) -> tuple[np.ndarray, list]:
    """Rows of one phase -> experts [tokens, L, k] in (prompt, token) order, and token ids."""
    if df.empty:
        return np.zeros((0, L, k), dtype=np.int64), []
    df = df.sort_values(["prompt_id", "token_idx", "layer_pos", "rank"], kind="stable")
    sizes = df.groupby(["prompt_id", "token_idx"], sort=True).size()
    bad = sizes[sizes != L * k]
    if len(bad):
        (pid, tok), n = bad.index[0], int(bad.iloc[0])
        raise ProfileError(f"{where}: token {tok} of prompt {pid} has {n} routing rows; expected one "
                           f"per MoE layer and rank ({L} layers x top-{k} = {L * k})")
    mat = df["expert"].to_numpy(dtype=np.int64).reshape(-1, L, k)
    return mat, list(sizes.index)


def build_workload(traces: pd.DataFrame, *, moe_layers: tuple[int, ...], experts_per_layer: int,
                   top_k: int, batch_size: int, prompt_tokens: int, generated_tokens: int,
                   source: str = "traces") -> Workload:
    """Validate a trace DataFrame against the model and lay out prefill and decode steps.

    Raises:
        ProfileError: missing columns, an unknown phase, a layer that is not an MoE layer, an
            expert index out of range, a rank >= top_k or a token with missing rows.
    """
    missing = [c for c in TRACE_COLUMNS if c not in traces.columns]
    if missing:
        raise ProfileError(f"{source}: missing trace column(s) {', '.join(missing)}; expected "
                           f"{', '.join(TRACE_COLUMNS)}")
    layer_pos = {layer: i for i, layer in enumerate(moe_layers)}
    L, E, k = len(moe_layers), experts_per_layer, top_k
    df = traces[list(TRACE_COLUMNS)]
    phases = set(df["phase"].unique())
    if not phases <= {"prefill", "decode"}:
        raise ProfileError(f"{source}: column 'phase' has {sorted(phases - {'prefill', 'decode'})}; "
                           f"expected prefill or decode")
    bad_layers = sorted(set(df["layer"].unique()) - set(layer_pos))
    if bad_layers:
        raise ProfileError(f"{source}: trace names layer {bad_layers[0]}, which is not an MoE layer "
                           f"of the model (MoE layers: {list(moe_layers)}); use traces of this model")
    ex = df["expert"].to_numpy()
    if len(ex) and (ex.min() < 0 or ex.max() >= E):
        row = df.iloc[int(np.argmax((ex < 0) | (ex >= E)))]
        raise ProfileError(f"{source}: trace names expert {int(row['expert'])} of layer "
                           f"{int(row['layer'])}, but the model has experts 0..{E - 1} per layer")
    rk = df["rank"].to_numpy()
    if len(rk) and (rk.min() < 0 or rk.max() >= k):
        raise ProfileError(f"{source}: trace has rank {int(rk.max())}, but the model routes top-{k}; "
                           f"use traces of this model")
    df = df.assign(layer_pos=df["layer"].map(layer_pos))
    dec, dec_ids = _token_matrix(df[df["phase"] == "decode"], L, k, source)
    pre, pre_ids = _token_matrix(df[df["phase"] == "prefill"], L, k, source)
    if len(dec) == 0:
        raise ProfileError(f"{source}: the trace has no decode rows; record traces that include "
                           f"generated tokens")
    notes = []
    dec_by_prompt = _split(dec, dec_ids)
    pre_by_prompt = _split(pre, pre_ids)
    prompts = sorted(dec_by_prompt)
    B = batch_size
    if len(prompts) < B:
        notes.append(f"trace has {len(prompts)} prompts for batch {B}; slots replay the same prompts")
    cycled = False
    slots_dec, slots_pre = [], []
    for slot in range(B):
        chunks, n, j = [], 0, slot
        while n < generated_tokens:
            pid = prompts[j % len(prompts)]
            chunk = dec_by_prompt[pid]
            chunks.append(chunk)
            n += len(chunk)
            j += B
            if j >= len(prompts) and n < generated_tokens:
                cycled = True
        slots_dec.append(np.concatenate(chunks)[:generated_tokens])
        first = prompts[slot % len(prompts)]
        p = pre_by_prompt.get(first)
        if prompt_tokens:
            if p is None or len(p) == 0:
                p = dec_by_prompt[first]
                notes.append("trace has no prefill rows; prefill replays decode routing")
            reps = -(-prompt_tokens // len(p))
            slots_pre.append(np.concatenate([p] * reps)[:prompt_tokens])
    if cycled:
        notes.append(f"trace has fewer than {generated_tokens} decode tokens per slot; replay cycles")
    steps = []
    if prompt_tokens:
        steps.append(Step("prefill", B * prompt_tokens, prompt_tokens,
                          _union(np.concatenate(slots_pre, axis=0))))
    dec_steps = np.stack(slots_dec, axis=1)  # [T, B, L, k]
    counts = np.zeros((L, E), dtype=np.int64)
    for t in range(generated_tokens):
        layers = _union(dec_steps[t])
        for li, (experts, tok) in enumerate(layers):
            counts[li, list(experts)] += 1
        steps.append(Step("decode", B, prompt_tokens + t + 1, layers))
    return Workload(tuple(moe_layers), E, B, prompt_tokens, tuple(steps), counts, source,
                    tuple(dict.fromkeys(notes)))


def with_placement(workload: Workload, traces: pd.DataFrame, *, source: str) -> Workload:
    """`workload` with static placements (static-hot, hot-first host placement) ranked by the
    decode activations of other traces — e.g. another split's — instead of the replayed ones.

    Every decode token of the placement traces counts once for each expert it was routed to
    (whatever the prompts' lengths and the batch); the traces are checked against the model
    (columns, MoE layers, expert range) by `profiles.traces.placement_counts`, which the runtime
    ranks by too.

    Raises:
        ProfileError: the placement traces do not fit the model (see `build_workload`).
    """
    from profiles.traces import placement_counts

    counts = placement_counts(traces, workload.moe_layers, workload.experts_per_layer, source)
    note = f"static placements ranked by the decode activations of {source}"
    return replace(workload, placement_counts=counts, placement_source=source,
                   notes=tuple(dict.fromkeys(workload.notes + (note,))))


def _split(mat: np.ndarray, ids: list) -> dict[int, np.ndarray]:
    out: dict[int, list[int]] = {}
    for i, (pid, _) in enumerate(ids):
        out.setdefault(int(pid), []).append(i)
    return {pid: mat[rows] for pid, rows in out.items()}


def _union(tokens: np.ndarray) -> tuple[LayerExperts, ...]:
    """[n, L, k] experts of n tokens -> per layer (experts, tokens routed to each)."""
    n, L, k = tokens.shape
    if n == 1:
        return tuple((tuple(int(e) for e in tokens[0, li]), (1,) * k) for li in range(L))
    out = []
    for li in range(L):
        experts, counts = np.unique(tokens[:, li, :], return_counts=True)
        out.append((tuple(experts.tolist()), tuple(counts.tolist())))
    return tuple(out)
