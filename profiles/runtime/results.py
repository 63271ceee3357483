"""What one run of the offloaded runtime measured; every figure here is `measured`.

The fields mirror the simulator's `SimResult` where both have them (tokens/s, TPOT, TTFT, bytes
moved, hit rates, busy fractions), so predicted and measured runs compare field by field. The
timeline and the routing the run saw are kept alongside (not serialized) for the Perfetto trace
and for feeding the simulator the same workload (`routing_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
import torch

_NOT_SERIALIZED = ("spans", "routing", "fetches", "expert_sizes", "logits", "geometry",
                   "storage_policy")
TRACE_COLUMNS = ("prompt_id", "task", "phase", "token_idx", "layer", "rank", "expert", "gate")


@dataclass(frozen=True)
class RunResult:
    """Measured figures of one run (decode phase for throughput and hit rate).

    Attributes:
        tokens: decode steps x batch (what tokens/s counts, as the simulator does).
        time_s, prefill_s, decode_s: wall-clock seconds of the whole run, the prefill step and
            the decode steps.
        tokens_per_s: tokens / decode_s. tpot_s: decode_s / decode steps. ttft_s: from the start
            to the end of the first decode step.
        bytes_h2d: bytes copied host -> device (demand, prefetch, background); of which
            bytes_h2d_prefetch by prefetches and background copies.
        hit_rate / prefill_hit_rate: cache hits / accesses (staged experts count as hits).
        prefetch_accuracy: share of the experts a layer used that the predictor had named.
        link_achieved_gbps: bytes moved / time the copy stream was busy (GB/s, measured).
        *_busy_fraction: busy time of a timeline track / time_s.
        decode_overlap_fraction: share of GPU decode time during which a copy was running.
        cache_capacity_bytes: the expert cache's capacity (None = unlimited);
            cache_peak_bytes: its largest bookkeeping occupancy; resident_peak_bytes: the largest
            total of the resident experts' tensor storage, measured from the tensors held.
        host_expert_bytes: host memory holding the packed experts.
    """

    model: str
    policy: str
    device: str
    batch_size: int
    prompt_tokens: int
    steps: int
    tokens: int
    time_s: float
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    tpot_s: float
    ttft_s: float
    bytes_h2d: int
    bytes_h2d_prefetch: int
    transfers: int
    cpu_expert_runs: int
    hits: int
    misses: int
    hit_rate: float
    prefill_hits: int
    prefill_misses: int
    prefill_hit_rate: float
    prefetch_accuracy: float | None
    link_achieved_gbps: float | None
    link_busy_fraction: float
    decode_busy_fraction: float
    decode_overlap_fraction: float | None
    compute_busy_fraction: float
    cpu_decode_busy_fraction: float
    gpu_budget_bytes: int | None
    cache_capacity_bytes: float | None
    cache_peak_bytes: int
    resident_peak_bytes: int
    kv_cache_bytes: int
    staging_bytes: int
    host_expert_bytes: int
    preload_bytes: int
    device_peak_bytes: int | None
    output_ids: list[list[int]]
    config: dict[str, Any]
    notes: tuple[str, ...] = ()
    bytes_disk: int = 0                # bytes of expert records read from disk (the disk tier)
    disk_reads: int = 0
    disk_busy_fraction: float = 0.0    # share of the run with at least one disk read in flight
    placement_traces: str | None = None  # what ranked static-hot (None: the run's own routing)
    spans: list = field(default_factory=list, repr=False, compare=False)
    routing: list = field(default_factory=list, repr=False, compare=False)
    fetches: list = field(default_factory=list, repr=False, compare=False)
    expert_sizes: dict = field(default_factory=dict, repr=False, compare=False)
    logits: list = field(default_factory=list, repr=False, compare=False)
    geometry: Any = field(default=None, repr=False, compare=False)
    storage_policy: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SERIALIZED}
        d["config"] = dict(self.config)
        d["output_ids"] = [list(row) for row in self.output_ids]
        d["notes"] = list(self.notes)
        d["measurement"] = (f"measured by the moesz runtime on {self.device} (wall clock; one run "
                            f"after a warm-up pass)")
        return d

    def routing_frame(self, task: str = "runtime") -> pd.DataFrame:
        """The routing this run saw, as a trace table (the columns of `profiles.traces`): one row
        per sequence, token, MoE layer and rank; prefill tokens first, then decode tokens."""
        rows: dict[str, list] = {c: [] for c in TRACE_COLUMNS}
        token = [0] * self.batch_size
        for phase, layers in self.routing:
            if not layers:
                continue
            T = layers[0][1][0].shape[0]
            per_seq = T // self.batch_size
            for li, (layer, (idx, w)) in enumerate(layers):
                k = idx.shape[1]
                for t in range(T):
                    seq, tok = divmod(t, per_seq)
                    for r in range(k):
                        rows["prompt_id"].append(seq)
                        rows["task"].append(task)
                        rows["phase"].append(phase)
                        rows["token_idx"].append(token[seq] + tok)
                        rows["layer"].append(layer)
                        rows["rank"].append(r)
                        rows["expert"].append(int(idx[t, r]))
                        rows["gate"].append(float(w[t, r]))
            for seq in range(self.batch_size):
                token[seq] += per_seq
        return pd.DataFrame(rows)


def tensor_list(t: torch.Tensor) -> list[list[int]]:
    return [[int(x) for x in row] for row in t.tolist()]
