"""Routing traces: which experts every token selects, recorded from the routers of a real model.

Forward hooks on the routers (`ExpertMap.routers`) read the routing decision of every MoE layer. In
transformers 5 the router of mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2/v3, gpt_oss and
phimoe is a module (`mlp.gate` or `mlp.router`) whose forward returns `(router_logits,
top_k_weights, top_k_indices)` over the flattened [batch * seq] tokens; the weights are the gates
the MoE block multiplies the experts' outputs by (after each architecture's normalisation and
scaling). A router that returns bare logits (remote-code models) is read as softmax top-k.

A trace has one row per real token x MoE layer x rank, with exactly the columns `TRACE_COLUMNS`:
prompt tokens in phase `prefill` and generated tokens fed back through the model in phase `decode`.
`token_idx` is the token's position in its own sequence: prompt tokens from 0 (a BOS token
included), generated tokens continuing after the prompt (as the runtime's traces count). Left
padding and rows that have already ended are never recorded, and the token that ends a sequence
(the end token, or the last one allowed) is not fed back, so it has no routing. `rank` 0 is the
expert with the largest gate. The simulator (`sim.workload`) replays these files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from profiles.errors import ModelError, ProfileError
from profiles.fileio import atomic_write_with

TRACE_COLUMNS = ("prompt_id", "task", "phase", "token_idx", "layer", "rank", "expert", "gate")
Progress = Callable[[int, int, str], None]


class RouterRecorder:
    """Context manager that records routing decisions while a `greedy_generate` call runs.

    Pass `recorder.on_forward` as `greedy_generate(..., on_forward=...)`; `prompt_ids` and `tasks`
    name the prompts in the order they are generated.
    """

    def __init__(self, expert_map, prompt_ids: Sequence[int], tasks: Sequence[str]):
        if not expert_map.routers:
            raise ModelError("this model's expert map found no router modules to hook; routing "
                             "traces need a router per MoE layer (a `gate` or `router` child)")
        self.expert_map = expert_map
        self.top_k = expert_map.top_k
        self.prompt_ids = list(prompt_ids)
        self.tasks = list(tasks)
        self._handles: list[Any] = []
        self._chunks: list[dict[str, np.ndarray]] = []
        self._offset = 0
        self._rows = 0
        self._step: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> "RouterRecorder":
        for layer, router in sorted(self.expert_map.routers.items()):
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def on_forward(self, phase: str, real: torch.Tensor, positions: torch.Tensor) -> None:
        """Called by `greedy_generate` before each forward pass."""
        if phase == "prefill":
            self._offset += self._rows
            self._rows = real.shape[0]
        self._step = (phase, real.cpu(), positions.cpu())

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self._step is None:
                return
            phase, real, token_idx = self._step
            weights, experts = _routing(output, self.top_k, layer)
            if experts.shape[0] != real.numel():
                raise ModelError(f"layer {layer}: the router saw {experts.shape[0]} tokens, the "
                                 f"batch has {real.numel()}; this router layout is not supported")
            keep = real.reshape(-1)
            weights, experts = weights[keep], experts[keep]
            order = weights.argsort(dim=-1, descending=True, stable=True)
            weights, experts = weights.gather(1, order), experts.gather(1, order)
            rows = keep.nonzero().flatten() // real.shape[1] + self._offset
            k = experts.shape[1]
            self._chunks.append({
                "row": np.repeat(rows.numpy(), k),
                "phase": np.full(rows.numel() * k, phase == "decode"),
                "token_idx": np.repeat(token_idx.reshape(-1)[keep].numpy(), k),
                "layer": np.full(rows.numel() * k, layer),
                "rank": np.tile(np.arange(k), rows.numel()),
                "expert": experts.reshape(-1).numpy(),
                "gate": weights.reshape(-1).numpy(),
            })
        return hook

    def frame(self) -> pd.DataFrame:
        """The recorded rows as a DataFrame with `TRACE_COLUMNS`, sorted by prompt, phase, token,
        layer and rank."""
        if not self._chunks:
            return empty_trace()
        cat = {k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0]}
        pid = np.asarray(self.prompt_ids, dtype=np.int64)
        tasks = np.asarray(self.tasks, dtype=object)
        df = pd.DataFrame({
            "prompt_id": pid[cat["row"]],
            "task": tasks[cat["row"]],
            "phase": np.where(cat["phase"], "decode", "prefill"),
            "token_idx": cat["token_idx"].astype(np.int64),
            "layer": cat["layer"].astype(np.int64),
            "rank": cat["rank"].astype(np.int64),
            "expert": cat["expert"].astype(np.int64),
            "gate": cat["gate"].astype(np.float32),
        })
        df = df.sort_values(["prompt_id", "token_idx", "layer", "rank"], kind="stable")
        return df.reset_index(drop=True)


def _routing(output, top_k: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates [tokens, k] float32, experts [tokens, k] int64) from a router's output."""
    if isinstance(output, (tuple, list)) and len(output) >= 3:
        weights, experts = output[1], output[2]
        if weights.shape[-1] != experts.shape[-1]:  # dense [tokens, E] scores
            weights = weights.reshape(-1, weights.shape[-1]).gather(
                1, experts.reshape(-1, experts.shape[-1]).long())
    elif isinstance(output, torch.Tensor):
        probs = output.reshape(-1, output.shape[-1]).float().softmax(-1)
        weights, experts = probs.topk(top_k, dim=-1)
    else:
        raise ModelError(f"layer {layer}: the router returned {type(output).__name__}; expected "
                         f"(logits, weights, indices) or logits")
    k = experts.shape[-1]
    return (weights.detach().reshape(-1, k).float().cpu(),
            experts.detach().reshape(-1, k).long().cpu())


def empty_trace() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": pd.Series(dtype=np.int64), "task": pd.Series(dtype=object),
                         "phase": pd.Series(dtype=object), "token_idx": pd.Series(dtype=np.int64),
                         "layer": pd.Series(dtype=np.int64), "rank": pd.Series(dtype=np.int64),
                         "expert": pd.Series(dtype=np.int64), "gate": pd.Series(dtype=np.float32)})


def write_traces(df: pd.DataFrame, path: str | Path) -> None:
    """Write a trace DataFrame to parquet atomically (exactly `TRACE_COLUMNS`)."""
    check_columns(df, str(path))
    atomic_write_with(path, lambda tmp: df[list(TRACE_COLUMNS)].to_parquet(tmp, index=False))


def read_traces(path: str | Path) -> pd.DataFrame:
    """Read a trace parquet file and check its columns.

    Raises:
        ProfileError: the file is missing, unreadable or has other columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such trace file; record one with `moesz model trace`")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ProfileError(f"{path}: not a readable parquet trace file ({type(exc).__name__})"
                           ) from None
    check_columns(df, str(path))
    return df


def check_columns(df: pd.DataFrame, where: str) -> None:
    if tuple(df.columns) != TRACE_COLUMNS:
        raise ProfileError(f"{where}: trace columns are {list(df.columns)}; expected exactly "
                           f"{list(TRACE_COLUMNS)}")


@dataclass(frozen=True)
class TraceRecording:
    """A recorded trace and the generations it came from."""

    frame: pd.DataFrame
    prompts: tuple[str, ...]
    tasks: tuple[str, ...]
    generations: tuple[Any, ...]  # profiles.evaluation.generate.Generation per prompt


def record_traces(loaded, tasks: Sequence[str] | None = None, split: str = "profile",
                  limit: int = 32, seed: int = 0, batch_size: int = 64,
                  progress: Progress | None = None) -> TraceRecording:
    """Generate greedily on built-in task prompts and record every routing decision.

    Args:
        loaded: a `profiles.models.LoadedModel` (with a tokenizer).
        tasks: built-in task names (default: all).
        split: `profile` or `validate` (or `train`).
        limit: prompts per task.
        seed: selects the prompts.
        batch_size: prompts per forward pass.
        progress: `progress(done, total, label)` per batch.

    Raises:
        MoeszError: unknown task or split, limit < 1, a model without tokenizer or routers.
    """
    from profiles.evaluation.evaluate import answer_budget, task_examples

    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.spec}: no tokenizer files in the checkpoint directory; routing "
                         f"traces need one to encode prompts")
    examples = task_examples(tasks, split, limit, seed)
    return record_prompt_traces(
        loaded, [(task, [e.prompt for e in exs], answer_budget(loaded.tokenizer, exs), ())
                 for task, exs in examples.items()], batch_size, progress)


def record_prompt_traces(loaded, sources: Sequence[tuple[str, Sequence[str], int, Sequence[str]]],
                         batch_size: int = 64, progress: Progress | None = None
                         ) -> TraceRecording:
    """Generate greedily on any prompts and record every routing decision.

    Args:
        loaded: a `profiles.models.LoadedModel` (with a tokenizer).
        sources: (task name, prompts, max_new_tokens, stop strings) per task, in order.
        batch_size: prompts per forward pass.
        progress: `progress(done, total, label)` per batch.

    Raises:
        MoeszError: a model without tokenizer or routers, or no prompt at all.
    """
    from profiles.evaluation.generate import greedy_generate

    if loaded.tokenizer is None:
        raise ModelError(f"{loaded.spec}: no tokenizer files in the checkpoint directory; routing "
                         f"traces need one to encode prompts")
    prompts, names, gens = [], [], []
    for task, ps, _, _ in sources:
        prompts += list(ps)
        names += [task] * len(ps)
    recorder = RouterRecorder(loaded.expert_map, range(len(prompts)), names)
    with recorder:
        done = 0
        for task, ps, new, stop in sources:
            gens += greedy_generate(
                loaded.model, loaded.tokenizer, list(ps), new, batch_size, stop=stop,
                on_forward=recorder.on_forward, label=f"trace {task}",
                progress=None if progress is None else
                (lambda d, t, lab, base=done: progress(base + d, len(prompts), lab)))
            done += len(ps)
    return TraceRecording(recorder.frame(), tuple(prompts), tuple(names), tuple(gens))


# --- statistics --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerStats:
    """Routing statistics of one MoE layer over the tokens of a trace.

    Reuse is measured within each prompt's own token sequence (in `token_idx` order, over the
    phases selected): `reuse_gap_*_tokens` is the number of tokens since the same expert was last
    selected by this prompt in this layer, and `stack_distance_mean` the mean number of OTHER
    experts of the layer selected in between (the LRU stack distance: a per-layer LRU cache of C
    experts serving only this prompt keeps the expert when the distance is below C, the same
    token's other experts aside). First uses have neither.
    """

    layer: int
    tokens: int
    activations: tuple[int, ...]
    entropy_bits: float
    entropy_ratio: float
    gini: float
    reuse_gap_mean_tokens: float
    reuse_gap_median_tokens: float
    stack_distance_mean: float
    first_uses: int

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TraceStats:
    """Summary of a trace: per-layer statistics over the selected phase(s)."""

    phase: str  # "all", "prefill" or "decode"
    prompts: int
    tokens: int
    experts_per_layer: int
    layers: tuple[LayerStats, ...]

    def to_dict(self) -> dict:
        return {"phase": self.phase, "prompts": self.prompts, "tokens": self.tokens,
                "experts_per_layer": self.experts_per_layer,
                "layers": [s.to_dict() for s in self.layers]}


def activation_counts(df: pd.DataFrame, experts_per_layer: int) -> np.ndarray:
    """[layers, experts] activation counts, layers in ascending order of the `layer` column."""
    layers = sorted(df["layer"].unique())
    counts = np.zeros((len(layers), experts_per_layer), dtype=np.int64)
    pos = {layer: i for i, layer in enumerate(layers)}
    np.add.at(counts, (df["layer"].map(pos).to_numpy(), df["expert"].to_numpy()), 1)
    return counts


def placement_counts(df: pd.DataFrame, moe_layers: Sequence[int], experts_per_layer: int,
                     where: str = "placement traces") -> np.ndarray:
    """[MoE layer position, expert] decode activations that rank static placements: every decode
    token counts once for each expert it was routed to. The simulator (`sim.workload.
    with_placement`) and the runtime (`measure_throughput(placement_traces=...)`) both rank by it.

    Raises:
        ProfileError: missing columns, a layer that is not an MoE layer of the model, an expert
            out of range, or no decode rows.
    """
    check_columns(df, where)
    pos = {int(layer): i for i, layer in enumerate(moe_layers)}
    dec = df[df["phase"] == "decode"].drop_duplicates(["prompt_id", "token_idx", "layer", "expert"])
    if dec.empty:
        raise ProfileError(f"{where}: no decode rows; record traces that include generated tokens")
    bad = sorted(set(int(x) for x in dec["layer"].unique()) - set(pos))
    if bad:
        raise ProfileError(f"{where}: trace names layer {bad[0]}, which is not an MoE layer of the "
                           f"model (MoE layers: {list(moe_layers)}); use traces of this model")
    ex = dec["expert"].to_numpy(dtype=np.int64)
    if ex.min() < 0 or ex.max() >= experts_per_layer:
        raise ProfileError(f"{where}: trace names expert {int(ex.max())}, but the model has "
                           f"experts 0..{experts_per_layer - 1} per layer")
    counts = np.zeros((len(pos), experts_per_layer), dtype=np.int64)
    np.add.at(counts, (dec["layer"].map(pos).to_numpy(dtype=np.int64), ex), 1)
    return counts


def entropy_bits(counts) -> float:
    """Shannon entropy (bits) of the activation shares; 0 for no activations."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total == 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log2(p)).sum())


def gini(counts) -> float:
    """Gini coefficient of activation counts: 0 when every expert is used equally, (n-1)/n when
    one expert takes everything."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def trace_stats(df: pd.DataFrame, experts_per_layer: int, phase: str | None = None
                ) -> TraceStats:
    """Activation counts, entropy, Gini and reuse distances per layer.

    Args:
        df: a trace with `TRACE_COLUMNS`.
        experts_per_layer: routed experts per MoE layer (for the balance measures).
        phase: "prefill" or "decode" to restrict to one phase; None for all tokens.
    """
    check_columns(df, "trace")
    if phase is not None:
        df = df[df["phase"] == phase]
    if df.empty:
        return TraceStats(phase or "all", 0, 0, experts_per_layer, ())
    df = df.sort_values(["prompt_id", "token_idx", "layer", "rank"], kind="stable")
    counts = activation_counts(df, experts_per_layer)
    out = []
    for li, (layer, rows) in enumerate(df.groupby("layer", sort=True)):
        gaps, dists, firsts = _reuse(rows, experts_per_layer)
        tokens = len(rows.groupby(["prompt_id", "token_idx"]))
        h = entropy_bits(counts[li])
        out.append(LayerStats(
            int(layer), tokens, tuple(int(c) for c in counts[li]), h,
            float(h / np.log2(experts_per_layer)) if experts_per_layer > 1 else 1.0,
            gini(counts[li]),
            float(np.mean(gaps)) if gaps.size else float("nan"),
            float(np.median(gaps)) if gaps.size else float("nan"),
            float(np.mean(dists)) if dists.size else float("nan"), firsts))
    tokens = len(df.groupby(["prompt_id", "token_idx"]))
    return TraceStats(phase or "all", int(df["prompt_id"].nunique()), tokens, experts_per_layer,
                      tuple(out))


def _reuse(rows: pd.DataFrame, experts: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Reuse gaps (tokens) and LRU stack distances (experts) of one layer's rows."""
    gaps, dists, firsts = [], [], 0
    pid = rows["prompt_id"].to_numpy()
    key = rows["token_idx"].to_numpy()
    exp = rows["expert"].to_numpy()
    starts = np.flatnonzero(np.r_[True, (pid[1:] != pid[:-1]) | (key[1:] != key[:-1])])
    ends = np.r_[starts[1:], len(exp)]
    last = np.full(experts, -1, dtype=np.int64)
    t = 0
    for s, e in zip(starts, ends):
        if s > 0 and pid[s] != pid[s - 1]:
            last[:] = -1
            t = 0
        chosen = np.unique(exp[s:e])
        prev = last[chosen]
        seen = prev >= 0
        firsts += int((~seen).sum())
        if seen.any():
            gaps.append(t - prev[seen])
            dists.append((last[None, :] > prev[seen][:, None]).sum(axis=1))
        last[chosen] = t
        t += 1
    return _cat(gaps), _cat(dists), firsts


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)
