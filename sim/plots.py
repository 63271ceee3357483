"""The memory-budget sweep plot: predicted decode tokens/s against the GPU budget, one line per
(compression policy, cache policy), simulation solid and closed form dashed."""

from __future__ import annotations

import os
from typing import Sequence

from profiles.fileio import atomic_write_with

# file types matplotlib's Agg backend writes, by extension (it picks the format from it)
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif",
                 ".tiff", ".webp")


def plot_budget_sweep(path: str | os.PathLike, rows: Sequence, title: str) -> None:
    """Write the plot; `rows` are `sim.study.StudyRow`s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str, str], list] = {}
    for r in rows:
        key = (r.varied["policy"], r.varied["cache"], r.varied.get("host_mem", "unlimited"))
        lines.setdefault(key, []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (policy, cache, host), rs in lines.items():
        rs = sorted(rs, key=lambda r: r.result.gpu_budget_bytes or 0)
        x = [(r.result.gpu_budget_bytes or 0) / 2**30 for r in rs]
        label = f"{policy}, {cache}" + (f", host {host}" if host != "unlimited" else "")
        (line,) = ax.plot(x, [r.result.tokens_per_s for r in rs], marker="o",
                          label=f"{label} (simulation)")
        cf = [r.closed_form_tokens_per_s for r in rs]
        if all(v is not None for v in cf):
            ax.plot(x, cf, linestyle="--", color=line.get_color(), alpha=0.7,
                    label=f"{label} (closed form)")
    ax.set_xlabel("GPU memory budget (GiB)")
    ax.set_ylabel("decode tokens/s (predicted)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=120, format=str(path).rsplit(".", 1)[-1]))
    plt.close(fig)
