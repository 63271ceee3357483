"""Export a simulated timeline: Chrome trace JSON (opens in Perfetto / chrome://tracing) and a
matplotlib Gantt chart of a time window.

Format: `{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}` with one thread
per resource (`GPU compute`, `GPU decode`, `H2D link`, `CPU decode`, `CPU compute`, `SSD read`,
`steps`), complete events (`"ph": "X"`, `ts`/`dur` in microseconds) named like
`fetch L3 E5`, `prefetch L4 E1`, `expert L3 E5`, `attention L3`, and `args` with the layer and
expert. The real runtime writes the same layout so the two open side by side.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from profiles.fileio import atomic_write_json, atomic_write_with

TRACKS = ("steps", "GPU compute", "GPU decode", "H2D link", "CPU decode", "CPU compute", "SSD read")


def _describe(track: str, item: Any) -> tuple[str, str, dict]:
    """(name, category, args) of one span."""
    if isinstance(item, tuple) and isinstance(item[0], int):  # (layer, expert) computed on the GPU
        return f"expert L{item[0]} E{item[1]}", "expert", {"layer": item[0], "expert": item[1]}
    if isinstance(item, tuple):
        kind, layer = item[0], item[1]
        if kind == "step":
            return f"{layer} step", "step", {}
        return (f"{kind} L{layer}" if layer >= 0 else kind), kind, {"layer": layer}
    layer, expert = item.key
    kind = item.kind
    if kind == "use":
        kind = "expert" if track == "GPU compute" else "decode"
    elif kind == "cpu":
        kind = "cpu expert" if track == "CPU compute" else track.lower()
    elif track == "GPU decode" or (track == "GPU compute" and kind in ("fetch", "prefetch")):
        kind = f"decode ({item.kind})"
    elif track in ("SSD read", "CPU decode"):
        kind = f"{track.split()[0].lower()} ({item.kind})"
    return f"{kind} L{layer} E{expert}", kind.split()[0], {"layer": layer, "expert": expert}


def spans_of(sim: Any) -> list[tuple[str, Any, float, float]]:
    """All recorded spans of a finished `Simulation` (run with `record=True`), steps included."""
    if sim.recorder is None:
        raise ValueError("the simulation was run without record=True")
    steps = [("steps", ("step", phase), s, e) for phase, s, e in sim.step_marks]
    return steps + list(sim.recorder.spans)


def chrome_trace(spans: Iterable[tuple[str, Any, float, float]], meta: dict | None = None) -> dict:
    """Chrome trace JSON object from spans (seconds)."""
    tids = {name: i + 1 for i, name in enumerate(TRACKS)}
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0,
                           "args": {"name": "moesz simulation (predicted)"}}]
    for name, tid in tids.items():
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid,
                       "args": {"sort_index": tid}})
    for track, item, start, end in spans:
        name, cat, args = _describe(track, item)
        events.append({"name": name, "cat": cat, "ph": "X", "pid": 1,
                       "tid": tids.setdefault(track, len(tids) + 1),
                       "ts": round(start * 1e6, 3), "dur": round((end - start) * 1e6, 3),
                       "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": dict(meta or {})}


def write_chrome_trace(path: str | os.PathLike, spans: Iterable, meta: dict | None = None) -> None:
    atomic_write_json(path, chrome_trace(spans, meta))


_COLORS = {"attention": "#9aa5b1", "lm_head": "#6b7785", "expert": "#2f7ed8", "fetch": "#e4572e",
           "prefetch": "#f3a712", "decode": "#29a35a", "cpu": "#8e44ad", "ssd": "#7f5539",
           "step": "#d0d7de"}


def plot_gantt(path: str | os.PathLike, spans: Iterable, window_s: tuple[float, float] | None = None,
               title: str = "simulated timeline (predicted)") -> None:
    """Write a Gantt chart (PNG/SVG/PDF by extension) of the spans inside `window_s`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = list(spans)
    if window_s is None:
        end = max((s[3] for s in spans), default=0.0)
        window_s = (0.0, end)
    t0, t1 = window_s
    used = [t for t in TRACKS if any(s[0] == t for s in spans)]
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(used) + 1.5))
    for row, track in enumerate(used):
        bars: dict[str, list] = {}
        for tr, item, start, end in spans:
            if tr != track or end < t0 or start > t1:
                continue
            _, cat, _ = _describe(tr, item)
            bars.setdefault(cat, []).append(((start - t0) * 1e3, (end - start) * 1e3))
        for cat, xs in bars.items():
            ax.broken_barh(xs, (row - 0.4, 0.8), facecolors=_COLORS.get(cat, "#999999"),
                           edgecolor="white", linewidth=0.3, label=cat)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), loc="upper right", fontsize=7, ncol=4)
    ax.set_yticks(range(len(used)), used)
    ax.set_xlim(0, (t1 - t0) * 1e3)
    ax.set_xlabel(f"time since {t0 * 1e3:.3f} ms (ms)")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=120, format=str(path).rsplit(".", 1)[-1]))
    plt.close(fig)
