"""Rate-distortion of codecs on a tensor: ratio against RMSE and max error, and the Pareto front.

From the rows `profiles.codecs.bench.bench` measured (every codec x level on every tensor), a
point is on a tensor's Pareto front when no other point of that tensor has at least its ratio and
at most its RMSE, one of them strictly. `plot` draws ratio against RMSE per tensor (log RMSE), one
marker per codec, levels joined, the front as a step line; exact codecs (RMSE 0) sit at the left
edge. Used by `moesz codecs bench --rd [--plot FILE]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from profiles.codecs.bench import BenchRow
from profiles.fileio import atomic_write_with

#: file types matplotlib's Agg backend writes, by extension
PLOT_SUFFIXES = (".png", ".svg", ".svgz", ".pdf", ".jpg", ".jpeg", ".webp", ".eps", ".ps",
                 ".tif", ".tiff")


@dataclass(frozen=True)
class RdPoint:
    """One measured point: a codec at a level on a tensor, and whether it is on the front."""

    row: BenchRow
    pareto: bool

    @property
    def label(self) -> str:
        r = self.row
        return r.codec if r.level is None else f"{r.codec} {r.mode} {r.level:g}"


def pareto_flags(rows: Sequence[BenchRow]) -> list[bool]:
    """For each row, whether it is on its tensor's (ratio up, RMSE down) Pareto front."""
    flags = []
    for r in rows:
        dominated = any(o.tensor == r.tensor and o.ratio >= r.ratio and o.rmse <= r.rmse
                        and (o.ratio > r.ratio or o.rmse < r.rmse) for o in rows)
        flags.append(not dominated)
    return flags


def rd_points(rows: Sequence[BenchRow]) -> dict[str, list[RdPoint]]:
    """Points per tensor (in first-seen order), each sorted by RMSE then by falling ratio."""
    out: dict[str, list[RdPoint]] = {}
    for r, flag in zip(rows, pareto_flags(rows)):
        out.setdefault(r.tensor, []).append(RdPoint(r, flag))
    for pts in out.values():
        pts.sort(key=lambda p: (p.row.rmse, -p.row.ratio))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot(rows: Sequence[BenchRow], path: str | Path, title: str = "") -> Path:
    """Write the ratio-vs-RMSE plot (one panel per tensor, up to 12) to `path` atomically.

    The format follows the extension (`PLOT_SUFFIXES`).

    Returns:
        The path written.
    """
    points = rd_points(rows)
    names = list(points)[:12]
    plt = _plt()
    cols = min(3, len(names)) or 1
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False,
                             layout="constrained")
    codecs = list(dict.fromkeys(r.codec for r in rows))
    markers = "osD^v<>phX*P"
    for ax, name in zip(axes.flat, names):
        pts = points[name]
        positive = [p.row.rmse for p in pts if p.row.rmse > 0]
        floor = min(positive) / 3 if positive else 1e-6    # where exact codecs are drawn
        for i, codec in enumerate(codecs):
            mine = sorted((p for p in pts if p.row.codec == codec), key=lambda p: p.row.rmse)
            if not mine:
                continue
            xs = [max(p.row.rmse, floor) for p in mine]
            ax.plot(xs, [p.row.ratio for p in mine], marker=markers[i % len(markers)],
                    markersize=5, linewidth=1, label=codec)
        front = [p for p in pts if p.pareto]
        ax.step([max(p.row.rmse, floor) for p in front], [p.row.ratio for p in front],
                where="post", color="black", linewidth=2, alpha=0.25, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("RMSE (measured; exact codecs drawn at the left edge)")
        ax.set_ylabel("ratio vs original bytes (measured)")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))
    plt.close(fig)
    return path


__all__ = ["RdPoint", "pareto_flags", "rd_points", "plot", "PLOT_SUFFIXES"]
