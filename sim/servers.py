"""Serial resources for the simulator: a link, a decoder, a compute stream, a pool of CPU workers.

A `Server` runs at most `capacity` jobs at once, each for a fixed duration, and queues the rest
in two FIFO queues: demand (priority 0) before prefetch (priority 1). It is driven by simpy
timeouts with callbacks rather than one process per job, which keeps the event count per expert
transfer small (one timeout per stage). `promote` moves a queued prefetch job to the demand
queue, so a demand that finds its expert already queued for prefetch does not wait behind other
prefetches. A server that only ever sees FIFO demand work in submission order (the GPU compute
stream when decompression has its own stream) is booked with `reserve` instead, which computes
start and end times without scheduling an event.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import simpy
from simpy.events import Timeout

DEMAND, PREFETCH = 0, 1
URGENT = -1   # demand work that continues the job just finished on the same unit: queue front


class Recorder:
    """Collects (track, item, start_s, end_s) spans for the timeline export."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any, float, float]] = []

    def add(self, track: str, item: Any, start: float, end: float) -> None:
        self.spans.append((track, item, start, end))


class Server:
    """A resource with `capacity` parallel units and demand-before-prefetch FIFO queues."""

    __slots__ = ("env", "name", "capacity", "busy", "busy_s", "queues", "recorder", "free_at",
                 "track_busy_s", "active_s", "_since")

    def __init__(self, env: simpy.Environment, name: str, capacity: int = 1,
                 recorder: Recorder | None = None) -> None:
        self.env = env
        self.name = name
        self.capacity = capacity
        self.busy = 0
        self.busy_s = 0.0
        self.queues: tuple[deque, deque] = (deque(), deque())
        self.recorder = recorder
        self.free_at = 0.0  # for `reserve`
        self.track_busy_s: dict[str, float] = {}
        self.active_s = 0.0   # time with at least one job running (the union of its spans)
        self._since = 0.0

    def submit(self, item: Any, duration: float, prio: int, then: Callable[[Any], None],
               track: str | None = None) -> list:
        """Run `item` for `duration` seconds when a unit is free; call `then(item)` after.
        `track` names the timeline track of the span (default: the server's name).

        Returns the queue entry (usable with `promote`).
        """
        entry = [item, duration, then, 0.0, track or self.name]
        if self.busy < self.capacity:  # start at once (inlined _start: this is the hot path)
            if not self.busy:
                self._since = self.env._now
            self.busy += 1
            entry[3] = self.env._now
            Timeout(self.env, duration, entry).callbacks.append(self._finish)
        elif prio == URGENT:
            self.queues[DEMAND].appendleft(entry)
        else:
            self.queues[prio].append(entry)
        return entry

    def reserve(self, item: Any, duration: float) -> float:
        """Book `duration` seconds at the earliest time the server is free; return the end time.

        No event is scheduled: valid only for a capacity-1 server whose every job is booked this
        way, in order, with one priority (then FIFO start times are exactly these).
        """
        now = self.env._now
        start = self.free_at if self.free_at > now else now
        end = start + duration
        self.free_at = end
        self.busy_s += duration
        if self.recorder is not None:
            self.recorder.add(self.name, item, start, end)
        return end

    def promote(self, entry: list) -> None:
        """Move a queued prefetch entry to the demand queue (no-op once it has started)."""
        low = self.queues[PREFETCH]
        for i, other in enumerate(low):
            if other is entry:
                del low[i]
                self.queues[DEMAND].append(entry)
                return

    def _start(self, entry: list) -> None:
        # called as a job finishes: the server stays active, its busy interval goes on
        self.busy += 1
        entry[3] = self.env.now
        ev = Timeout(self.env, entry[1], entry)
        ev.callbacks.append(self._finish)

    def _finish(self, ev: Timeout) -> None:
        entry = ev._value
        self.busy -= 1
        self.busy_s += entry[1]
        track = entry[4]
        self.track_busy_s[track] = self.track_busy_s.get(track, 0.0) + entry[1]
        if self.recorder is not None:
            self.recorder.add(track, entry[0], entry[3], self.env.now)
        high, low = self.queues
        if high:
            self._start(high.popleft())
        elif low:
            self._start(low.popleft())
        elif not self.busy:
            self.active_s += self.env.now - self._since
        entry[2](entry[0])

    def busy_fraction(self, makespan_s: float) -> float:
        return self.busy_s / (self.capacity * makespan_s) if makespan_s > 0 else 0.0

    def active_fraction(self, makespan_s: float) -> float:
        """Share of the makespan with at least one job running."""
        return self.active_s / makespan_s if makespan_s > 0 else 0.0


class Track:
    """A named view of a shared `Server`: jobs queue on the server in one FIFO with everything
    else it runs, while their spans and busy time are kept under this track's name. The CPU
    device is one: copy, decode and compute run one after another in the model's thread."""

    __slots__ = ("server", "name")

    def __init__(self, server: Server, name: str) -> None:
        self.server, self.name = server, name

    def submit(self, item: Any, duration: float, prio: int, then: Callable[[Any], None]) -> list:
        return self.server.submit(item, duration, prio, then, self.name)

    def promote(self, entry: list) -> None:
        self.server.promote(entry)

    def busy_fraction(self, makespan_s: float) -> float:
        busy = self.server.track_busy_s.get(self.name, 0.0)
        return busy / makespan_s if makespan_s > 0 else 0.0
