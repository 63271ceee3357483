"""The hardware profile: frozen dataclasses for the JSON document of kind `hardware_profile`.

Every number carries a `source`: `measured` (by `moesz profile hardware` on this machine),
`published` (a datasheet or paper; `note` names it) or `estimated` (derived; `note` says how).
Links follow FlexGen's lesson and are fitted from samples rather than taken from datasheets:
`time_s(bytes) = latency_s + bytes / (gbps * 1e9)`. Codec throughputs are in GB/s of the
original data at 2 bytes per value (bf16), whatever dtype the samples had, so one figure serves
every model. The JSON layout is documented in `docs/hardware-profile.md`; parsing lives in
`profiles.hardware.parse`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

SCHEMA_VERSION = 1
KIND = "hardware_profile"
SOURCES = ("measured", "published", "estimated")


@dataclass(frozen=True)
class Figure:
    """One number with its provenance."""

    value: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class LinkFit:
    """A transfer-time fit `latency_s + bytes / (gbps * 1e9)`; `fit_rel_error` is the largest
    relative error of the fit over its samples (None for published or estimated fits)."""

    latency_s: float
    gbps: float
    source: str
    note: str = ""
    fit_rel_error: float | None = None

    def time_s(self, nbytes: float) -> float:
        # bytes / (GB/s * 1e9 B/GB) -> seconds
        return self.latency_s + nbytes / (self.gbps * 1e9)


@dataclass(frozen=True)
class LevelCurve:
    """Codec throughput against error-bound level, in GB/s of original bf16 bytes.

    Interpolated linearly in log(level) and clamped at the ends; one point means a flat curve.
    """

    levels: tuple[float, ...]
    gbps: tuple[float, ...]
    source: str
    mode: str | None = None
    note: str = ""

    def at(self, level: float | None) -> float:
        if len(self.levels) == 1 or level is None or level <= 0:
            return self.gbps[0]
        x = math.log(level)
        xs = [math.log(v) for v in self.levels]
        if x <= xs[0]:
            return self.gbps[0]
        if x >= xs[-1]:
            return self.gbps[-1]
        i = bisect.bisect_right(xs, x)
        t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return self.gbps[i - 1] + t * (self.gbps[i] - self.gbps[i - 1])


@dataclass(frozen=True)
class TokenCurve:
    """Seconds against a token count; piecewise linear, constant below the first point and
    extrapolated with the last segment's slope above the last."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    source: str
    note: str = ""

    def at(self, tokens: float) -> float:
        ts, ss = self.tokens, self.seconds
        if len(ts) == 1 or tokens <= ts[0]:
            return ss[0]
        i = bisect.bisect_left(ts, tokens)
        if i >= len(ts):
            i = len(ts) - 1
        slope = (ss[i] - ss[i - 1]) / (ts[i] - ts[i - 1])
        return max(0.0, ss[i - 1] + slope * (tokens - ts[i - 1]))


@dataclass(frozen=True)
class ThreadScaling:
    """Aggregate decode throughput of `threads[i]` worker threads each decoding its own expert at
    once, as a multiple of one thread's (`speedup[i]`; 1.0 at one thread). Between and beyond the
    measured counts the nearest lower count's figure is used (more threads than cores add
    nothing)."""

    threads: tuple[int, ...]
    speedup: tuple[float, ...]
    source: str
    note: str = ""

    def at(self, threads: int) -> float:
        i = bisect.bisect_right(self.threads, max(1, int(threads))) - 1
        return self.speedup[max(i, 0)]


@dataclass(frozen=True)
class CodecSpeed:
    """Host (CPU, one thread) encode and decode throughput of one codec; `threads`: how decode
    throughput grows with worker threads decoding different experts at once (None: linear, the
    assumption of profiles that did not measure it)."""

    decode: LevelCurve
    encode: LevelCurve | None = None
    threads: ThreadScaling | None = None

    def parallel(self, workers: int) -> float:
        """How many experts' worth of one-thread decode `workers` threads finish per unit time."""
        return float(workers) if self.threads is None else min(float(workers),
                                                              self.threads.at(workers))


@dataclass(frozen=True)
class DiskCurve:
    """Disk read throughput by request size and reads in flight, measured with the page cache
    bypassed: `gbps[i][j]` is the aggregate GB/s of reads of `sizes[i]` bytes with `depths[j]`
    reads in flight. `best_depth` is the depth the runtime uses by default (the smallest within
    5 % of the best throughput at the size of a packed expert record, or at the largest size)."""

    sizes: tuple[int, ...]
    depths: tuple[int, ...]
    gbps: tuple[tuple[float, ...], ...]
    best_depth: int
    method: str
    source: str
    note: str = ""
    fit_rel_error: float | None = None

    def aggregate_gbps(self, nbytes: float, depth: int) -> float:
        """Aggregate GB/s of reads of `nbytes` with `depth` in flight: linear in log(size) between
        measured sizes (clamped at the ends), the nearest lower measured depth."""
        j = max(bisect.bisect_right(self.depths, max(1, int(depth))) - 1, 0)
        col = tuple(row[j] for row in self.gbps)
        return LevelCurve(tuple(float(s) for s in self.sizes), col, self.source).at(max(nbytes, 1))

    def read_s(self, nbytes: float, depth: int = 1) -> float:
        """Seconds one read of `nbytes` takes while `depth` reads of that size are in flight."""
        depth = max(1, int(depth))
        return depth * nbytes / (self.aggregate_gbps(nbytes, depth) * 1e9)

    def read_s_array(self, nbytes, depth):
        """`read_s` over arrays (numpy): `nbytes` and `depth` broadcast together."""
        import numpy as np

        b = np.maximum(np.asarray(nbytes, dtype=np.float64), 1.0)
        d = np.maximum(np.asarray(depth, dtype=np.float64), 1.0)
        b, d = np.broadcast_arrays(b, d)
        j = np.clip(np.searchsorted(self.depths, d, side="right") - 1, 0, len(self.depths) - 1)
        xs = np.log(np.asarray(self.sizes, dtype=np.float64))
        grid = np.asarray(self.gbps, dtype=np.float64)       # [size, depth]
        out = np.empty(b.shape)
        for k in np.unique(j):
            sel = j == k
            g = np.interp(np.log(b[sel]), xs, grid[:, k])    # clamped at the ends
            out[sel] = d[sel] * b[sel] / (g * 1e9)
        return out


@dataclass(frozen=True)
class CpuExpertFFN:
    """CPU time of one expert FFN of a reference shape against tokens; other shapes scale by
    parameter count (both the weight-read and the FLOP term are proportional to it)."""

    hidden_size: int
    intermediate_size: int
    curve: TokenCurve
    dtype: str = "bf16"

    @property
    def params(self) -> int:
        # gate, up and down projections: 3 * H * I
        return 3 * self.hidden_size * self.intermediate_size

    def seconds(self, tokens: float, params: int) -> float:
        return self.curve.at(tokens) * params / self.params


@dataclass(frozen=True)
class HostProfile:
    cpu: str
    cores: Figure
    memory_bytes: Figure
    memcpy_gbps: Figure
    disk_read: LinkFit
    codecs: Mapping[str, CodecSpeed] = field(default_factory=dict)
    cpu_expert_ffn: CpuExpertFFN | None = None
    disk_curve: DiskCurve | None = None
    record_check_gbps: Figure | None = None   # CRC32 of a record read from disk, one thread

    def disk_record_s(self, nbytes: float, depth: int = 1) -> float:
        """Seconds one packed record of `nbytes` takes to come off the disk tier with `depth`
        reads in flight: its read, then its CRC32 check by the same thread."""
        check = (nbytes / (self.record_check_gbps.value * 1e9)
                 if self.record_check_gbps is not None else 0.0)
        return self.disk_read_s(nbytes, depth) + check

    def disk_record_s_array(self, nbytes, depth):
        """`disk_record_s` over numpy arrays."""
        import numpy as np

        b = np.asarray(nbytes, dtype=np.float64)
        check = (b / (self.record_check_gbps.value * 1e9)
                 if self.record_check_gbps is not None else 0.0)
        return self.disk_read_s_array(b, depth) + check

    def disk_read_s(self, nbytes: float, depth: int = 1) -> float:
        """Seconds one read of `nbytes` takes with `depth` reads in flight: from the measured curve
        when there is one, else from the one-read-at-a-time fit (depth then does not help)."""
        if self.disk_curve is not None:
            return self.disk_curve.read_s(nbytes, depth)
        return self.disk_read.time_s(nbytes)

    def disk_read_s_array(self, nbytes, depth):
        """`disk_read_s` over numpy arrays."""
        if self.disk_curve is not None:
            return self.disk_curve.read_s_array(nbytes, depth)
        import numpy as np

        return self.disk_read.latency_s + np.asarray(nbytes, dtype=np.float64) / (
            self.disk_read.gbps * 1e9) + 0.0 * np.asarray(depth, dtype=np.float64)

    @property
    def disk_depth(self) -> int:
        """Reads in flight the runtime uses by default: the curve's best depth, else 1."""
        return self.disk_curve.best_depth if self.disk_curve is not None else 1


@dataclass(frozen=True)
class GpuProfile:
    """The device the runtime computes on: a CUDA GPU, or (`device_type` "cpu") the CPU itself on
    a machine without a GPU, where the "link" is the memory copy the runtime performs and copy,
    in-place decode and compute share the one thread that runs the model."""

    name: str
    memory_bytes: Figure
    h2d_pinned: LinkFit
    h2d_pageable: LinkFit
    d2h_pinned: LinkFit
    d2h_pageable: LinkFit
    h2d_under_compute_gbps: Figure
    bf16_gemm_tflops: Figure
    d2d_gbps: Figure
    decode: Mapping[str, LevelCurve] = field(default_factory=dict)
    device_type: str = "cuda"
    threads: int | None = None    # the CPU device: torch threads its figures were measured with

    @property
    def serial(self) -> bool:
        """Copy, decode and compute run one after another on one thread (the CPU device)."""
        return self.device_type == "cpu"

    def h2d(self, pinned: bool) -> LinkFit:
        return self.h2d_pinned if pinned else self.h2d_pageable


@dataclass(frozen=True)
class AttentionTimings:
    """Seconds of one decoder layer's attention + router against batch and context length;
    `seconds[i][j]` is for `batch[i]` and `context_tokens[j]`. Bilinear, linear extrapolation."""

    batch: tuple[int, ...]
    context_tokens: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]
    source: str
    note: str = ""

    def at(self, batch: float, context: float) -> float:
        rows = [TokenCurve(self.context_tokens, row, self.source).at(context)
                for row in self.seconds]
        return TokenCurve(self.batch, tuple(rows), self.source).at(batch)


@dataclass(frozen=True)
class BatchTimings:
    """What the runtime's calibration measured at one batch size on the CPU device: expert FFN
    seconds by tokens (the same expert runs ~25 % slower inside a batch-1 step than inside a
    batch-4 one on small experts: the serving loop's other work between experts evicts its
    caches), and the seconds a fetched expert costs the model's thread beyond its copy and
    decode (the runtime's own per-miss work)."""

    batch: int
    expert_ffn: TokenCurve
    miss_overhead_s: float = 0.0


@dataclass(frozen=True)
class ModelTimings:
    """Timings of one model's shapes on this machine (measured, or estimated for big ones).
    `by_batch`: per calibrated batch size, ascending (CPU device calibrations; empty otherwise)."""

    model: str
    hidden_size: int
    expert_intermediate_size: int
    expert_ffn: TokenCurve
    attention_router: AttentionTimings
    lm_head: TokenCurve | None = None
    by_batch: tuple[BatchTimings, ...] = ()
    # the CPU device's seconds per host-codec miss beyond its decode's held share of Python's
    # lock (calibrated at batch 1 on cold runs of `sz3` experts against the simulator, as the
    # two below; None: not calibrated)
    host_miss_overhead_s: float | None = None
    # and per miss of an expert decoded in place on the CPU device, beyond its copy and decode
    # (calibrated on cold runs of `szp` experts)
    decode_miss_overhead_s: float | None = None
    # and per record the disk tier reads (handing it back under Python's lock; calibrated on cold
    # runs of raw experts served from disk)
    disk_read_overhead_s: float | None = None

    def _between(self, batch: float):
        """(lower, upper, weight of upper) of the calibrated batches around `batch`, clamped."""
        bt = self.by_batch
        if batch <= bt[0].batch:
            return bt[0], bt[0], 0.0
        for lo, hi in zip(bt, bt[1:]):
            if batch <= hi.batch:
                return lo, hi, (batch - lo.batch) / (hi.batch - lo.batch)
        return bt[-1], bt[-1], 0.0

    def expert_s(self, tokens: float, batch: float | None = None) -> float:
        """One expert's FFN seconds for `tokens` tokens inside a step of `batch` sequences
        (interpolated between calibrated batches, the first one without a batch; the all-batch
        curve where none was calibrated)."""
        if not self.by_batch:
            return self.expert_ffn.at(tokens)
        lo, hi, w = self._between(batch if batch is not None else self.by_batch[0].batch)
        return (1 - w) * lo.expert_ffn.at(tokens) + w * hi.expert_ffn.at(tokens)

    def miss_overhead_s(self, batch: float | None = None) -> float:
        """The runtime's own seconds per fetched expert at `batch` (0 where not calibrated)."""
        if not self.by_batch:
            return 0.0
        lo, hi, w = self._between(batch if batch is not None else self.by_batch[0].batch)
        return (1 - w) * lo.miss_overhead_s + w * hi.miss_overhead_s

    def matches(self, geometry: Any) -> bool:
        return (self.model == getattr(geometry, "name", None)
                or (self.hidden_size == geometry.hidden_size
                    and self.expert_intermediate_size == geometry.expert_intermediate_size))


@dataclass(frozen=True)
class ProfileSource:
    """Where the profile came from: a preset's citation or a measuring run's command and host."""

    kind: str  # "preset" or "measured"
    description: str
    date: str
    command: str | None = None
    hostname: str | None = None
    packages: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HardwareProfile:
    """A whole hardware profile. `origin` is the path or `preset:NAME` it was loaded from."""

    name: str
    host: HostProfile
    source: ProfileSource
    gpu: GpuProfile | None = None
    model_timings: tuple[ModelTimings, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)
    origin: str = ""

    def timings_for(self, geometry: Any) -> ModelTimings | None:
        """The model timings measured for this geometry's shapes, if any."""
        for mt in self.model_timings:
            if mt.matches(geometry):
                return mt
        return None

    def to_dict(self) -> dict[str, Any]:
        from profiles.hardware.parse import profile_to_dict

        return profile_to_dict(self)
