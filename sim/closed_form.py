"""The closed-form per-layer cost model: decode tokens/s in microseconds, for the planner's search.

Per decode step, every decoder layer costs its attention + router time (and the step its LM
head), and each MoE layer l adds its expert phase X_l. With U_l experts per step, m_l of them
missing, and q_l the fraction of steps with at least one miss, a miss moves through stages
(SSD read when not in host memory, CPU decode, link `latency + bytes / GB/s`, GPU decode,
compute) as a flow shop of identical jobs: the first miss costs the sum of its stages (it starts
only after the router, so nothing hides it) and each further one the slowest stage's period
(steady state). Hits only compute. So, with m1 = m_l / q_l misses in a step that has any:

    X_l = (1 - q_l) * T_hits(U_l) + q_l * max(T_hits(U_l), first_l + (m1 - 1) * period_l)

Hit rates come from `sim.reuse` (one pass over the traces): LRU through reuse gaps weighted by
the bytes of the experts used in between (global cache) or exact stack distances (per-layer
slots); static-hot from activation counts. LFU and prefetch are left to the simulation: LFU is
predicted as LRU and prefetch as none, and `notes` says so. The simulation never calls this.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from profiles.errors import ConfigError
from profiles.hardware import HardwareProfile
from profiles.serving import ServingConfig
from sim.costs import CPU, GPU, ExpertCosts, uniform_costs
from sim.memory import memory_layout
from sim.reuse import ReuseStats, reuse_stats
from sim.shape import check_geometry, expert_params
from sim.timing import TimeModel
from sim.workload import Workload, build_workload


class ClosedFormModel:
    """Predict decode tokens/s for per-layer expert sizes and decode speeds.

    Args:
        hardware: profile with a `gpu` section.
        geometry: model geometry.
        serving: budgets, cache policy and allocation, resident form, on-miss, batch, tokens.
        traces: a routing-trace DataFrame or a prepared `Workload` (decode steps are used).
        stats, times: precomputed `reuse_stats(workload)` and `TimeModel`, to share between
            models that differ only in budgets or cache policy.

    Per-layer inputs (arrays of length `num_moe_layers`, or `[n, num_moe_layers]` for the
    vectorized `tokens_per_s_many`):
        bytes_per_expert_by_layer: stored (compressed) bytes of one expert.
        decode_gbps_by_layer: decode throughput in GB/s of original bf16 bytes; 0, NaN or inf
            means no decoding (raw).
        cpu_decode_by_layer: True where the codec decodes on the CPU (host workers; the link
            then carries the original bytes).
        With `on_miss = cpu`, missed experts are decoded and run on the CPU (one thread), so the
        decode rate given is the host's rate for that codec. Host rates are per thread; the
        `serving.cpu_workers` workers each decode a whole expert, together at the profile's
        measured thread scaling.
        With a CPU device (`hardware.gpu.serial`), copy, in-place decode and compute of the
        experts share one thread; disk reads and host-codec workers run beside it.
    """

    def __init__(self, hardware: HardwareProfile, geometry: Any, serving: ServingConfig,
                 traces: pd.DataFrame | Workload, *, stats: ReuseStats | None = None,
                 times: TimeModel | None = None) -> None:
        check_geometry(geometry)
        self.g, self.hw, self.serving = geometry, hardware, serving
        self.times = times or TimeModel(hardware, geometry, serving.batch_size)
        if isinstance(traces, Workload):
            wl = traces
        else:
            wl = build_workload(traces, moe_layers=tuple(geometry.moe_layers),
                                experts_per_layer=geometry.experts_per_layer, top_k=geometry.top_k,
                                batch_size=serving.batch_size, prompt_tokens=serving.prompt_tokens,
                                generated_tokens=serving.generated_tokens)
        self.workload = wl
        self.L = len(geometry.moe_layers)
        self.original_bytes = int(geometry.bytes_per_expert)
        self.bf16_bytes = 2.0 * expert_params(geometry)
        self.stats = st = stats if stats is not None else reuse_stats(wl)
        self._layer_rows = np.arange(self.L)
        self.notes: list[str] = []
        if serving.cache_policy == "lfu":
            self.notes.append("closed form predicts LFU as LRU (LFU is left to the simulation)")
        if serving.prefetch != "none":
            self.notes.append("closed form ignores prefetch (left to the simulation)")
        link = hardware.gpu.h2d(serving.pinned)
        self.link_latency_s, self.link_bps = link.latency_s, link.gbps * 1e9
        self.serial = hardware.gpu.serial          # the CPU device: copy/decode/compute in turn
        from sim.costs import cpu_parallel
        from sim.engine import disk_depth

        self.disk_depth = disk_depth(hardware, serving)
        self.cpu_parallel = lambda k: cpu_parallel(hardware, None, int(k))
        from sim.costs import gil_share

        self.gil = gil_share(hardware) if self.serial else 0.0
        B = serving.batch_size
        dec = wl.decode_steps
        t = self.times
        # fixed GPU time per step: attention + router of every layer, then the LM head
        self.fixed_s = float(np.mean([
            geometry.num_layers * t.attention_s(s.tokens, B, s.context, "decode") + t.lm_head_s(B)
            for s in dec]))
        comp = np.zeros(self.L)
        cpu = np.zeros(self.L)
        for s in dec:
            for li, (experts, counts) in enumerate(s.layers):
                comp[li] += sum(t.expert_s(n) for n in counts)
                cpu[li] += sum(t.cpu_expert_s(n) for n in counts)
        self.compute_s = comp / len(dec)  # [L] GPU expert compute per step
        self.expert_s = self.compute_s / st.union_mean  # [L] per expert
        self.cpu_expert_s = cpu / np.maximum(st.accesses, 1)  # [L] per expert on the CPU
        # memory: the cache capacity does not depend on the policy (staging is decompressed)
        ref = uniform_costs(tuple(geometry.moe_layers), geometry.experts_per_layer,
                            original_bytes=self.original_bytes)
        self.mem = memory_layout(geometry, serving, ref, wl.hot_order())
        self.capacity = self.mem.cache_capacity_bytes
        self.host_budget = self.mem.host_budget_bytes
        self._fixed_hits = None
        if serving.resident_form == "decompressed":
            m, q = self._miss_stats(np.full((1, self.L), float(self.original_bytes)))
            self._fixed_hits = (np.array(m[0]), np.array(q[0]))

    # -- hit model ---------------------------------------------------------------------------
    def _miss_stats(self, resident: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean misses per step m [n, L] and fraction of steps with a miss q [n, L]."""
        resident = np.atleast_2d(resident)
        st, S, n = self.stats, self.stats.steps, resident.shape[0]
        rows = self._layer_rows
        policy = self.serving.cache_policy
        slots = self.serving.per_layer_cache_slots
        if slots is not None:
            c = np.minimum(np.asarray(slots), st.slot_hit_le.shape[1] - 1)
            if policy == "static-hot":
                k = np.minimum(c, st.layer_rank_lt.shape[1] - 1)
                hits, good = st.layer_rank_lt[rows, k], st.layer_rank_step_lt[rows, k]
            else:
                hits, good = st.slot_hit_le[rows, c], st.slot_step_le[rows, c]
            m = (st.accesses - hits) / S
            q = 1.0 - good / S
            return np.broadcast_to(m, (n, self.L)), np.broadcast_to(q, (n, self.L))
        cap = self.capacity
        if policy == "static-hot":
            if np.isinf(cap):
                k = np.full(n, st.hot_layer.size)
            else:
                cum = np.cumsum(resident[:, st.hot_layer], axis=1)  # [n, N]
                k = (cum <= cap).sum(axis=1)
            hits, good = st.rank_lt[:, k].T, st.rank_step_lt[:, k].T  # [n, L]
        elif np.all(resident == resident[:, :1]):  # LRU, equal sizes: exact stack distances
            c = np.full(n, st.lru_hit_le.shape[1] - 1) if np.isinf(cap) else np.minimum(
                (cap // resident[:, 0]).astype(np.int64), st.lru_hit_le.shape[1] - 1)
            hits, good = st.lru_hit_le[:, c].T, st.lru_step_le[:, c].T
        else:  # LRU with per-layer sizes (and LFU, predicted as LRU): characteristic time
            if np.isinf(cap):
                d = np.full(n, st.distinct.shape[1] - 1)
            else:
                working = resident @ st.distinct  # [n, G] bytes used in a window of g steps
                d = (working <= cap).sum(axis=1) - 1  # largest gap whose window fits
                d = np.maximum(d, 0)
            hits, good = st.hit_le[:, d].T, st.step_le[:, d].T
        return (st.accesses[None, :] - hits) / S, 1.0 - good / S

    # -- evaluation ----------------------------------------------------------------------------
    def tokens_per_s(self, bytes_per_expert_by_layer, decode_gbps_by_layer=None,
                     cpu_decode_by_layer=None) -> float:
        """Predicted decode tokens/s (closed form) for one per-layer policy."""
        b = np.asarray(bytes_per_expert_by_layer, dtype=np.float64)
        if b.shape != (self.L,):
            raise ConfigError(f"closed form: got {b.size} per-layer values; the model has "
                              f"{self.L} MoE layers")
        if not (b.min() > 0 and b.max() < np.inf):
            raise ConfigError("closed form: bytes per expert must be finite and > 0")
        layers = self._layer_s(b, decode_gbps_by_layer, cpu_decode_by_layer)
        return self.serving.batch_size / (self.fixed_s + float(layers.sum()))

    def tokens_per_s_many(self, bytes_per_expert_by_layer, decode_gbps_by_layer=None,
                          cpu_decode_by_layer=None) -> np.ndarray:
        """Vectorized: inputs `[n, L]`, returns predicted decode tokens/s `[n]`."""
        return self.serving.batch_size / self.step_s_many(
            bytes_per_expert_by_layer, decode_gbps_by_layer, cpu_decode_by_layer)

    def layer_s_many(self, bytes_per_expert_by_layer, decode_gbps_by_layer=None,
                     cpu_decode_by_layer=None) -> np.ndarray:
        """Expected expert-phase seconds per decode step of each MoE layer, `[n, L]`."""
        b = np.atleast_2d(np.asarray(bytes_per_expert_by_layer, dtype=np.float64))
        if b.shape[-1] != self.L:
            raise ConfigError(f"closed form: got {b.shape[-1]} per-layer values; the model has "
                              f"{self.L} MoE layers")
        if not (b.min() > 0 and b.max() < np.inf):
            raise ConfigError("closed form: bytes per expert must be finite and > 0")
        return self._layer_s(b, decode_gbps_by_layer, cpu_decode_by_layer)

    def _layer_s(self, b: np.ndarray, gb, cd) -> np.ndarray:
        s = self.serving
        # decode time of one expert: values * 2 bytes at GB/s of bf16 bytes
        if gb is None:
            dec_s = np.zeros(b.shape)
        else:
            gb = np.asarray(gb, dtype=np.float64)
            dec_s = np.divide(self.bf16_bytes / 1e9, gb, out=np.zeros(np.broadcast(b, gb).shape),
                              where=(gb > 0) & (gb < np.inf))
        W = s.cpu_workers
        cpu_k = None
        if cd is not None and np.any(cd):
            cd = np.broadcast_to(np.asarray(cd, dtype=bool), dec_s.shape)
            cpu_dec = dec_s          # one worker alone; scaled below by the misses decoding at once
            gpu_dec = np.where(cd, 0.0, dec_s)
            link_b = np.where(cd, float(self.original_bytes), b)
        else:
            cd, cpu_dec, gpu_dec, link_b = None, None, dec_s, b
        if s.gpu_decode == "stream" and s.gpu_decode_slowdown != 1.0:
            gpu_dec = gpu_dec * s.gpu_decode_slowdown
        U, C = self.stats.union_mean, self.expert_s
        inline = s.gpu_decode == "compute"
        if s.resident_form == "compressed":
            held = dec_s > 0 if cd is None else (dec_s > 0) & ~cd
            m, q = self._miss_stats(np.where(held, b, float(self.original_bytes)))
            hit_dec, fetch_dec = np.where(held, gpu_dec, 0.0), 0.0
            # hits: a two-stage flow shop (decode stream -> compute) of identical jobs
            c_hit = C + hit_dec if inline else C
            d_hit = 0.0 if inline else hit_dec
            T_all = U * np.maximum(c_hit, d_hit) + np.minimum(c_hit, d_hit)
        else:
            m, q = self._fixed_hits
            hit_dec, fetch_dec = 0.0, gpu_dec
            c_hit = d_hit = None
            T_all = self.compute_s
        m1 = np.divide(m, q, out=np.zeros(np.broadcast(m, q).shape), where=q > 0)
        more = np.maximum(m1 - 1.0, 0.0)  # misses after the first, in a step that has any
        if cpu_dec is not None:
            # k of a step's misses decode at once on the workers, each at parallel(k) / k
            cpu_k = np.clip(np.rint(m1), 1, W)
            ks, inv = np.unique(cpu_k, return_inverse=True)
            par = np.array([self.cpu_parallel(k) for k in ks])[inv].reshape(cpu_k.shape)
            cpu_dec = np.where(cd, cpu_dec * cpu_k / par, 0.0)
        link_s = self.link_latency_s + link_b / self.link_bps
        ssd = ssd_period = None
        read_over = 0.0   # the CPU device's own work per record read, in the model's thread
        if self.host_budget is not None:
            # SSD reads: misses of experts outside host memory (cold, so nearly always misses),
            # up to `disk_depth` of a step's reads in flight at once
            frac = self._ssd_fraction(b, m)
            want = np.rint(m1 * frac)
            k = np.clip(want, 1, self.disk_depth)
            read = self.hw.host.disk_record_s_array(b, k)
            # reads that fit the depth land together; beyond it they queue, k at a time
            ssd = frac * read
            ssd_period = np.where(want > self.disk_depth, frac * read / k, 0.0)
            read_over = frac * self.times.disk_read_overhead_s
        if s.on_miss == "cpu":
            cpu_c = self.cpu_expert_s
            mdec = dec_s + read_over  # decoded in the thread that runs the expert, then computed
            first = mdec + cpu_c
            period = mdec + cpu_c
            if ssd is not None:
                first, period = first + ssd, np.maximum(period, ssd_period)
            k = np.maximum(U - m1, 0.0)
            hit_part = k * C if c_hit is None else (
                k * np.maximum(c_hit, d_hit) + np.where(k > 0, np.minimum(c_hit, d_hit), 0.0))
            miss_part = np.maximum(hit_part, first + more * period)
            if self.serial:
                # the CPU device: the hits' compute and the missed experts' runs share the
                # model's thread, one after the other (disk reads still run beside them)
                miss_part = np.maximum(hit_part + m1 * (mdec + cpu_c), first + more * period)
        elif self.serial:
            # the CPU device: each miss's copy and decode run in the model's thread after its
            # disk read / worker decode, hits compute meanwhile; host-codec workers copy too
            dec_miss = fetch_dec + hit_dec
            # a host-codec miss holds the model's thread for the decode's share of Python's lock
            # (and the runtime's own work per fetched expert, in the model's thread too)
            miss = self.times.miss_overhead_s + np.where(
                fetch_dec + hit_dec > 0, self.times.decode_miss_overhead_s, 0.0)
            s_work = read_over + (link_s + dec_miss + miss if cpu_dec is None else np.where(
                cd, self.gil * dec_s + self.times.host_miss_overhead_s, link_s + dec_miss + miss))
            p_first, p_period = 0.0, 0.0
            if cpu_dec is not None:
                # the workers decode (and copy) a step's misses at once when they fit the pool
                # (on the CPU device only the part of a decode that does not hold Python's
                # lock runs on the workers; the held part is in `s_work`, in the model's thread)
                worker = (1.0 - self.gil) * dec_s if self.gil > 0 else cpu_dec
                with_copy = np.where(cd, worker + link_s, 0.0)
                p_first = with_copy
                p_period = np.where(np.rint(m1) > W, with_copy / cpu_k, 0.0)
            if ssd is not None:
                p_first, p_period = p_first + ssd, np.maximum(p_period, ssd_period)
            one = s_work + C
            miss_part = np.maximum(T_all + m1 * s_work,
                                   p_first + one + more * np.maximum(p_period, one))
        else:
            comp_miss = C + fetch_dec + hit_dec if inline else C
            dec_miss = fetch_dec + hit_dec if not inline else 0.0
            first = link_s + dec_miss + comp_miss
            period = np.maximum(np.maximum(link_s, dec_miss), comp_miss)
            if cpu_dec is not None:
                first, period = first + cpu_dec, np.maximum(period, cpu_dec / cpu_k)
            if ssd is not None:
                first, period = first + ssd, np.maximum(period, ssd_period)
            miss_part = np.maximum(T_all, first + more * period)
        return T_all + q * (miss_part - T_all)

    def step_s_many(self, bytes_per_expert_by_layer, decode_gbps_by_layer=None,
                    cpu_decode_by_layer=None) -> np.ndarray:
        """Expected seconds per decode step, `[n]`."""
        return self.fixed_s + self.layer_s_many(bytes_per_expert_by_layer, decode_gbps_by_layer,
                                                cpu_decode_by_layer).sum(axis=-1)

    def _ssd_fraction(self, b: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Fraction of misses that must first be read from SSD, [n, L]. The host tier is an LRU
        of stored records within the host budget (as the runtime's and the simulation's), so a
        miss reads the disk when the records used in its reuse window outweigh the budget
        (characteristic time, as for the device cache's LRU with per-layer sizes)."""
        st = self.stats
        b = np.atleast_2d(b)
        if np.all(b.sum(axis=1) * self.g.experts_per_layer <= self.host_budget):
            return np.zeros(b.shape)       # every record fits in host memory: no disk tier
        working = b @ st.distinct          # [n, G] stored bytes used in a window of g steps
        d = np.maximum((working <= self.host_budget).sum(axis=1) - 1, 0)
        outside = (st.accesses[None, :] - st.hit_le[:, d].T) / st.steps  # [n, L] per step
        return np.clip(outside / np.maximum(m, 1e-12), 0.0, 1.0)

    # -- convenience -------------------------------------------------------------------------
    def inputs_from_costs(self, costs: ExpertCosts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-layer (bytes, decode GB/s, cpu_decode) from a simulator `ExpertCosts` (layer means)."""
        b = costs.stored_bytes.mean(axis=1).astype(np.float64)
        where = costs.decode_where
        cpu = (where == CPU).any(axis=1)
        dec = np.where(where == CPU, costs.cpu_decode_s,
                       np.where(where == GPU, costs.gpu_decode_s, 0.0)).mean(axis=1)
        if self.serving.on_miss == "cpu":
            dec = costs.cpu_miss_decode_s.mean(axis=1)
        elif self.serving.gpu_decode == "stream":
            dec = np.where(cpu, dec, dec / self.serving.gpu_decode_slowdown)
        gbps = np.where(dec > 0, self.bf16_bytes / np.where(dec > 0, dec, 1.0) / 1e9, 0.0)
        return b, gbps, cpu

    def tokens_per_s_costs(self, costs: ExpertCosts) -> float:
        """Predicted decode tokens/s for the per-expert costs the simulator would use."""
        return self.tokens_per_s(*self.inputs_from_costs(costs))
