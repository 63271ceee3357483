"""Synthetic routing traces for what-if studies on geometries that cannot run here.

Each MoE layer gets its own Zipf popularity over a random permutation of its experts
(p(rank r) ~ 1 / (r + 1)^s); a token picks `top_k` distinct experts by the Gumbel-top-k trick,
which samples without replacement in proportion to popularity. Temporal locality: with
probability `locality` a token reuses the previous token's experts at that layer (runs of
repeated routing, as seen in real decode traces). The output has exactly the columns of real
traces (`profiles.traces`): prompt_id, task, phase, token_idx, layer, rank, expert, gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from profiles.errors import ConfigError
from profiles.traces import TRACE_COLUMNS


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic trace: Zipf exponent, temporal locality, seed."""

    zipf_s: float = 1.1
    locality: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        return f"synthetic zipf:{self.zipf_s:g},locality:{self.locality:g},seed:{self.seed}"


def parse_synthetic(text: str) -> SyntheticSpec:
    """Parse `zipf:S[,locality:P][,seed:N]`, e.g. `zipf:1.1` or `zipf:0.8,locality:0.3`."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    values: dict[str, str] = {}
    for part in parts:
        key, _, val = part.partition(":")
        values[key.strip().lower()] = val.strip()
    bad = sorted(set(values) - {"zipf", "locality", "seed"})
    if "zipf" not in values or bad:
        raise ConfigError(f"--synthetic {text!r}: expected zipf:S[,locality:P][,seed:N], e.g. zipf:1.1")
    try:
        spec = SyntheticSpec(float(values["zipf"]), float(values.get("locality", 0.0)),
                             int(values.get("seed", 0)))
    except ValueError:
        raise ConfigError(f"--synthetic {text!r}: S and P must be numbers and N an integer") from None
    if not spec.zipf_s >= 0 or not 0 <= spec.locality < 1:
        raise ConfigError(f"--synthetic {text!r}: need zipf exponent S >= 0 and locality P in [0, 1)")
    return spec


def synthetic_traces(moe_layers: tuple[int, ...], experts_per_layer: int, top_k: int, *,
                     prompts: int, prompt_tokens: int, decode_tokens: int,
                     spec: SyntheticSpec = SyntheticSpec(), task: str = "synthetic") -> pd.DataFrame:
    """Generate a routing trace DataFrame.

    Args:
        moe_layers: model layer indices with routed experts (the `layer` column).
        experts_per_layer, top_k: routing shape.
        prompts: number of prompts (sequences).
        prompt_tokens: prefill tokens per prompt (phase `prefill`).
        decode_tokens: generated tokens per prompt (phase `decode`).
        spec: popularity, locality and seed.

    Returns:
        DataFrame with the trace columns, one row per (prompt, token, layer, rank).
    """
    if top_k > experts_per_layer:
        raise ConfigError(f"synthetic trace: top_k={top_k} > experts_per_layer={experts_per_layer}")
    rng = np.random.default_rng(spec.seed)
    L, E, k = len(moe_layers), experts_per_layer, top_k
    # per layer: popularity by rank, assigned to a random permutation of the experts
    ranks = np.arange(E, dtype=np.float64)
    pop = 1.0 / (ranks + 1.0) ** spec.zipf_s
    pop /= pop.sum()
    logp = np.empty((L, E))
    for li in range(L):
        logp[li, rng.permutation(E)] = np.log(pop)
    n_tok = prompt_tokens + decode_tokens
    experts = np.empty((prompts, n_tok, L, k), dtype=np.int32)
    gates = np.empty((prompts, n_tok, L, k), dtype=np.float32)
    prev_e = prev_g = None
    for t in range(n_tok):
        scores = logp[None, :, :] + rng.gumbel(size=(prompts, L, E))
        top = np.argpartition(-scores, k - 1, axis=2)[:, :, :k]
        top_scores = np.take_along_axis(scores, top, axis=2)
        order = np.argsort(-top_scores, axis=2)
        e_t = np.take_along_axis(top, order, axis=2)
        s_t = np.take_along_axis(top_scores, order, axis=2)
        g_t = np.exp(s_t - s_t[:, :, :1])
        g_t /= g_t.sum(axis=2, keepdims=True)
        if prev_e is not None and spec.locality > 0:
            keep = rng.random((prompts, L)) < spec.locality
            e_t = np.where(keep[:, :, None], prev_e, e_t)
            g_t = np.where(keep[:, :, None], prev_g, g_t)
        experts[:, t], gates[:, t] = e_t, g_t
        prev_e, prev_g = e_t, g_t
    p_idx, t_idx, l_idx, r_idx = np.meshgrid(np.arange(prompts), np.arange(n_tok), np.arange(L),
                                             np.arange(k), indexing="ij")
    decode = t_idx >= prompt_tokens
    df = pd.DataFrame({
        "prompt_id": p_idx.ravel().astype(np.int64),
        "task": task,
        "phase": np.where(decode, "decode", "prefill").ravel(),
        # the position in the prompt's own sequence: generated tokens continue after the prompt,
        # as in recorded traces (profiles.traces)
        "token_idx": t_idx.ravel().astype(np.int64),
        "layer": np.asarray(moe_layers, dtype=np.int64)[l_idx.ravel()],
        "rank": r_idx.ravel().astype(np.int64),
        "expert": experts.ravel().astype(np.int64),
        "gate": gates.ravel().astype(np.float64),
    })
    return df[list(TRACE_COLUMNS)]
