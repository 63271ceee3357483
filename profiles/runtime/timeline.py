"""Per-event timings of a real run, in the simulator's timeline layout.

Spans are `(track, item, start_s, end_s)` tuples exactly as `sim.timeline.chrome_trace` takes
them, with the simulator's track names (`steps`, `GPU compute`, `GPU decode`, `H2D link`,
`CPU decode`, `CPU compute`) and items (`(layer, expert)` for an expert computed on the device,
`("attention", layer)`, `("lm_head", -1)`, `("step", phase)`, or a `Job` with `kind` and `key`),
so a measured run and a simulated one open side by side in Perfetto.

On CUDA, device work is timed with CUDA events recorded on the stream that runs it (copy, decode
or compute stream) and resolved against one base event after the run; host work (CPU decode,
CPU experts, steps) is timed with `time.perf_counter` against the same origin. On a CPU device
everything is host work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

Span = tuple[str, Any, float, float]


@dataclass(frozen=True)
class Job:
    """What moved or was decoded: `kind` is fetch, prefetch, use (decode of a compressed resident
    expert) or cpu (a missed expert run on the CPU); `nbytes` the bytes it moved (0 if none)."""

    kind: str
    key: tuple[int, int]
    nbytes: int = 0


class Computed(tuple):
    """`(layer, expert)` of an expert computed on the device (the simulator's item for it), with
    the number of tokens it served in `tokens`."""

    def __new__(cls, key: tuple[int, int], tokens: int) -> "Computed":
        obj = super().__new__(cls, key)
        obj.tokens = tokens
        return obj

    def __reduce__(self):   # a run's spans pickle (to predict it again later)
        return Computed, (tuple(self), self.tokens)


class Timeline:
    """Collects spans of one run. `enabled=False` keeps only the bookkeeping the results need."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.reset()

    def reset(self) -> None:
        """Start a new origin (time 0) and drop recorded spans."""
        self._host: list[Span] = []
        self._device: list[tuple[str, Any, Any, Any]] = []
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def now(self) -> float:
        """Host seconds since the origin."""
        return time.perf_counter() - self._t0

    def host(self, track: str, item: Any, start: float, end: float) -> None:
        """Record host work that ran from `start` to `end` (values of `now()`)."""
        if self.enabled:
            self._host.append((track, item, start, end))

    def begin(self, stream: "torch.cuda.Stream | None" = None):
        """A start marker for device work about to be queued on `stream` (default: current)."""
        if not self.cuda:
            return self.now()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def end(self, marker, track: str, item: Any, stream: "torch.cuda.Stream | None" = None) -> None:
        """Close device work started at `marker`."""
        if not self.cuda:
            self.host(track, item, marker, self.now())
            return
        if self.enabled:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream)
            self._device.append((track, item, marker, ev))

    def spans(self) -> list[Span]:
        """Every span, device ones resolved (synchronizes CUDA), sorted by start time."""
        out = list(self._host)
        if self.cuda and self._device:
            torch.cuda.synchronize()
            for track, item, a, b in self._device:
                out.append((track, item, self._base.elapsed_time(a) / 1e3,
                            self._base.elapsed_time(b) / 1e3))
        out.sort(key=lambda s: s[2])
        return out


def busy_s(spans: list[Span], track: str) -> float:
    """Seconds during which `track` was busy (union of its spans)."""
    return _length(_union([(s[2], s[3]) for s in spans if s[0] == track]))


def overlap_s(spans: list[Span], track_a: str, track_b: str) -> float:
    """Seconds during which both tracks were busy at once."""
    a = _union([(s[2], s[3]) for s in spans if s[0] == track_a])
    b = _union([(s[2], s[3]) for s in spans if s[0] == track_b])
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(hi - lo for lo, hi in intervals)
