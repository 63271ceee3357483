"""What one simulation run predicts; every figure here is `predicted (simulation)`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SimResult:
    """Predicted figures of one run. Throughput figures are for the decode phase.

    Attributes:
        tokens: generated tokens (batch * decode steps).
        time_s: prefill + decode.
        tokens_per_s: decode throughput, tokens / decode_s.
        ttft_s: time to first token (prefill and the first decode step).
        tpot_s: time per output token per sequence (decode_s / decode steps).
        bytes_h2d: bytes copied host -> device (demand and prefetch); bytes_h2d_prefetch: of which
            prefetch; bytes_ssd: bytes read from SSD into host memory.
        hit_rate: decode-phase GPU cache hit rate (prefetched experts that arrived count as hits).
        link_h2d_gbps: the link bandwidth simulated.
        *_busy_fraction: busy time / (units * time_s).
        gpu_mem_bytes: peak GPU memory in use (non-expert weights, KV cache, staging, cache).
        host_mem_bytes: host memory holding stored experts.
    """

    tokens: int
    time_s: float
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    ttft_s: float
    tpot_s: float
    bytes_h2d: int
    bytes_h2d_prefetch: int
    bytes_ssd: int
    transfers: int
    ssd_reads: int
    cpu_expert_runs: int
    hits: int
    misses: int
    hit_rate: float
    prefill_hit_rate: float
    link_h2d_gbps: float
    link_busy_fraction: float
    decode_busy_fraction: float
    cpu_decode_busy_fraction: float
    cpu_compute_busy_fraction: float
    compute_busy_fraction: float
    gpu_mem_bytes: int
    gpu_budget_bytes: int | None
    cache_capacity_bytes: float | None
    kv_cache_bytes: int
    host_mem_bytes: int
    host_budget_bytes: int | None
    disk_busy_fraction: float = 0.0   # share of the time with at least one disk read in flight
    disk_depth: int = 1               # reads in flight the disk tier was simulated with
    labels: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["notes"] = list(self.notes)
        d["prediction"] = "simulation (moesz discrete-event simulator)"
        return d
