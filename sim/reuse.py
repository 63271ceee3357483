"""Reuse statistics of decode routing, precomputed once for the closed-form cost model.

From the decode steps of a workload, per MoE layer:
- `U`: mean number of distinct experts a step needs (the batch's union);
- reuse gaps: for each access, the steps since the same expert was last used (a first use counts
  back to the prefill, which touched every expert); `hit_le[l, g]` is the number of accesses with
  gap <= g and `step_le[l, g]` the number of steps whose largest gap is <= g;
- working sets: `distinct[l, d]` is the mean number of distinct experts of layer l used in a
  window of d consecutive steps, from the empty runs between each expert's uses (a window misses
  an expert exactly when it lies inside one of its empty runs);
- per-layer LRU stack distances (exact, in experts) for per-layer cache slots;
- hot ranks: each access's rank in the hot order (decode activations, most first), for
  static-hot placement.

- exact global LRU stack distances in experts (Bennett-Kruskal, prefill included): with every
  cached expert the same size (decompressed residency), an access hits a cache of C bytes
  exactly when its distance <= C // bytes_per_expert, so one pass serves every cache size.

With per-layer resident sizes (compressed residency under a per-layer policy) the distance in
bytes depends on the policy; a global LRU of capacity C bytes then keeps an access a hit when
the bytes of distinct experts used during its gap fit, sum_l bytes_l * distinct[l, gap] <= C
(the characteristic-time approximation of Che et al. for LRU, with per-layer byte weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.workload import Workload


@dataclass(frozen=True)
class ReuseStats:
    steps: int  # decode steps S
    union_mean: np.ndarray  # [L] mean distinct experts per step
    accesses: np.ndarray  # [L] decode accesses (step, expert) per layer
    hit_le: np.ndarray  # [L, S + 2] accesses with gap <= g
    step_le: np.ndarray  # [L, S + 2] steps whose largest gap <= g
    distinct: np.ndarray  # [L, S + 2] mean distinct experts in a window of g steps (g = 0..S+1)
    slot_hit_le: np.ndarray  # [L, E + 2] accesses with per-layer stack distance <= c
    slot_step_le: np.ndarray  # [L, E + 2] steps whose largest stack distance <= c
    rank_lt: np.ndarray  # [L, N + 1] accesses whose global hot rank < k
    rank_step_lt: np.ndarray  # [L, N + 1] steps whose largest hot rank < k
    layer_rank_lt: np.ndarray  # [L, E + 1] accesses whose rank within the layer < k
    layer_rank_step_lt: np.ndarray  # [L, E + 1] steps whose largest in-layer rank < k
    hot_layer: np.ndarray  # [N] layer position of the k-th hottest expert
    lru_hit_le: np.ndarray  # [L, N + 2] accesses with global LRU stack distance <= c experts
    lru_step_le: np.ndarray  # [L, N + 2] steps whose largest global stack distance <= c


def global_stack_distances(workload: Workload) -> list[list[np.ndarray]]:
    """Exact LRU stack distances (in experts, the expert itself included) of every decode access
    over all layers, prefill included in the history: `out[s][l]` is an array over the experts
    of decode step s, layer l. A cold expert gets N + 1. One pass, O(n log n) (Fenwick tree
    over access times, the classic Bennett-Kruskal method)."""
    L, E = len(workload.moe_layers), workload.experts_per_layer
    N = L * E
    seq = [(step.phase == "decode", li, step.layers[li][0])
           for step in workload.steps for li in range(L)]
    n = sum(len(ex) for _, _, ex in seq)
    tree = [0] * (n + 1)
    last = [-1] * N  # latest access time of each key
    marked = 0
    out: list[list[np.ndarray]] = []
    t = 0
    for is_decode, li, experts in seq:
        if is_decode and li == 0:
            out.append([])
        dists = []
        for e in experts:
            key = li * E + e
            p = last[key]
            if p < 0:
                d = N + 1
            else:
                # marked positions <= p (prefix sum), then unmark p
                i, pre = p + 1, 0
                while i > 0:
                    pre += tree[i]
                    i -= i & -i
                d = marked - pre + 1
                i = p + 1
                while i <= n:
                    tree[i] -= 1
                    i += i & -i
                marked -= 1
            i = t + 1
            while i <= n:
                tree[i] += 1
                i += i & -i
            marked += 1
            last[key] = t
            t += 1
            dists.append(d)
        if is_decode:
            out[-1].append(np.array(dists, dtype=np.int64))
    return out


def _cum_le(values: np.ndarray, size: int) -> np.ndarray:
    """counts[g] = #values <= g for g = 0..size-1 (values clipped into range)."""
    hist = np.bincount(np.clip(values, 0, size - 1), minlength=size)
    return np.cumsum(hist)


def reuse_stats(workload: Workload) -> ReuseStats:
    steps = workload.decode_steps
    S, L, E = len(steps), len(workload.moe_layers), workload.experts_per_layer
    N = L * E
    G = S + 2
    hot = workload.hot_order()
    rank = np.empty((L, E), dtype=np.int64)
    for r, (li, e) in enumerate(hot):
        rank[li, e] = r
    layer_rank = np.empty((L, E), dtype=np.int64)
    for li in range(L):
        order = [e for (lj, e) in hot if lj == li]
        layer_rank[li, order] = np.arange(E)
    hot_layer = np.array([li for li, _ in hot], dtype=np.int64)

    union = np.zeros(L)
    acc = np.zeros(L, dtype=np.int64)
    hit_le = np.zeros((L, G), dtype=np.int64)
    step_le = np.zeros((L, G), dtype=np.int64)
    distinct = np.zeros((L, G))
    slot_hit_le = np.zeros((L, E + 2), dtype=np.int64)
    slot_step_le = np.zeros((L, E + 2), dtype=np.int64)
    rank_lt = np.zeros((L, N + 1), dtype=np.int64)
    rank_step_lt = np.zeros((L, N + 1), dtype=np.int64)
    layer_rank_lt = np.zeros((L, E + 1), dtype=np.int64)
    layer_rank_step_lt = np.zeros((L, E + 1), dtype=np.int64)
    d = np.arange(G, dtype=np.float64)
    windows = np.maximum(S - d + 1, 1.0)
    gdist = global_stack_distances(workload)
    lru_hit_le = np.zeros((L, N + 2), dtype=np.int64)
    lru_step_le = np.zeros((L, N + 2), dtype=np.int64)
    for li in range(L):
        per_step = [gdist[s][li] for s in range(S)]
        lru_hit_le[li] = _cum_le(np.concatenate(per_step), N + 2)
        lru_step_le[li] = _cum_le(np.array([x.max() for x in per_step]), N + 2)
    for li in range(L):
        last = np.full(E, -1, dtype=np.int64)  # the prefill (step -1) used every expert
        gaps, maxgap, dists, maxdist, ranks, maxrank, lranks, maxlrank = ([] for _ in range(8))
        runs = []
        for s, step in enumerate(steps):
            ex = np.fromiter(step.layers[li][0], dtype=np.int64)
            g = s - last[ex]
            gaps.append(g)
            maxgap.append(g.max())
            # stack distance within the layer: distinct experts used in steps [last, s-1]
            dist = (last[None, :] >= last[ex][:, None]).sum(axis=1)
            dists.append(dist)
            maxdist.append(dist.max())
            r, lr = rank[li, ex], layer_rank[li, ex]
            ranks.append(r)
            maxrank.append(r.max())
            lranks.append(lr)
            maxlrank.append(lr.max())
            runs.append(np.where(last[ex] >= 0, s - last[ex] - 1, s))  # empty run before this use
            last[ex] = s
        seen = last >= 0
        runs.append(np.where(seen, S - 1 - last, S)[seen])  # trailing empty runs of used experts
        gaps_a, dists_a = np.concatenate(gaps), np.concatenate(dists)
        union[li] = len(gaps_a) / S
        acc[li] = len(gaps_a)
        hit_le[li] = _cum_le(gaps_a, G)
        step_le[li] = _cum_le(np.array(maxgap), G)
        slot_hit_le[li] = _cum_le(dists_a, E + 2)
        slot_step_le[li] = _cum_le(np.array(maxdist), E + 2)
        rank_lt[li, 1:] = _cum_le(np.concatenate(ranks), N)
        rank_step_lt[li, 1:] = _cum_le(np.array(maxrank), N)
        layer_rank_lt[li, 1:] = _cum_le(np.concatenate(lranks), E)
        layer_rank_step_lt[li, 1:] = _cum_le(np.array(maxlrank), E)
        # mean distinct experts in a window of d steps = sum over used experts of the fraction of
        # windows that are not inside one of its empty runs: (S-d+1 - sum_runs max(0, r-d+1)) / (S-d+1)
        r_all = np.concatenate(runs)
        r_all = r_all[r_all > 0]
        hist = np.bincount(r_all, minlength=G)[:G].astype(np.float64)
        cnt_ge = np.cumsum(hist[::-1])[::-1]  # runs with r >= d
        sum_ge = np.cumsum((hist * (np.arange(G) + 1))[::-1])[::-1]  # sum of (r + 1) over r >= d
        missed = sum_ge - d * cnt_ge
        distinct[li] = np.where(d >= 1, seen.sum() - missed / windows, 0.0)
        distinct[li, S + 1:] = seen.sum()
    return ReuseStats(S, union, acc, hit_le, step_le, distinct, slot_hit_le, slot_step_le,
                      rank_lt, rank_step_lt, layer_rank_lt, layer_rank_step_lt, hot_layer,
                      lru_hit_le, lru_step_le)
