"""Timing helpers for hardware measurement: medians after warm-up and the link fit.

Links are fitted to `time_s = latency_s + bytes / (gbps * 1e9)` from samples over a range of
transfer sizes, as FlexGen recommends (fit per-transfer overhead and bandwidth from real runs
rather than datasheets). The fit minimizes the RELATIVE error of each sample, so small transfers
(where latency dominates) weigh as much as large ones, and reports the largest relative error of
the fit over its samples.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Fit:
    """A fitted link: `latency_s + bytes / (gbps * 1e9)`; `max_rel_error` over the samples."""

    latency_s: float
    gbps: float
    max_rel_error: float


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None,
                   warmup: int = 1, min_total_s: float = 0.0,
                   max_repeats: int = 200) -> tuple[float, list[float]]:
    """Median wall time of `fn` over at least `repeats` runs after `warmup` untimed runs.

    Args:
        fn: the work to time.
        repeats: timed runs (at least 1).
        sync: called after each run before the clock stops (e.g. `torch.cuda.synchronize`).
        warmup: untimed runs first (allocator, caches, kernel compilation).
        min_total_s: keep repeating (up to `max_repeats`) until the samples add up to this many
            seconds, so that short operations get enough samples for a median that one
            descheduled run cannot move.
        max_repeats: the most timed runs.

    Returns:
        (median seconds, every timed sample in seconds).
    """
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    samples: list[float] = []
    while len(samples) < max(1, repeats) or (sum(samples) < min_total_s
                                            and len(samples) < max_repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def fit_link(nbytes: Sequence[float], seconds: Sequence[float]) -> Fit:
    """Least-relative-error fit of `seconds = latency + nbytes / bandwidth`.

    Args:
        nbytes: transfer sizes in bytes (at least two distinct sizes).
        seconds: the measured time of each transfer (median per size, or every sample).

    Returns:
        The fit; latency is clamped at 0 (a negative intercept is refitted through the origin).
    """
    x = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if len(x) < 2 or len(set(x.tolist())) < 2:
        raise ValueError("a link fit needs samples at two or more sizes")
    t = np.maximum(t, 1e-9)
    # minimize sum(((a + b*x - t) / t)^2): rows [1/t, x/t] . [a, b] = 1
    a_mat = np.stack([1.0 / t, x / t], axis=1)
    (a, b), *_ = np.linalg.lstsq(a_mat, np.ones_like(t), rcond=None)
    if a < 0 or b <= 0:
        a = 0.0
        b = float(np.sum(x / t) / np.sum((x / t) ** 2))
    b = max(b, 1e-18)
    pred = a + b * x
    err = float(np.max(np.abs(pred - t) / t))
    return Fit(latency_s=float(a), gbps=float(1.0 / b / 1e9), max_rel_error=err)
