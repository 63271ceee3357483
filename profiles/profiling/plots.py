"""Plots of a model profile (matplotlib, Agg backend, PNG files written atomically).

- `sensitivity_heatmap`: MoE layer x level, colour = content (or strict) accuracy change averaged
  over tasks, one panel per codec; a cell whose paired interval covers zero for every task (not
  significant) is hatched and its number greyed.
- `ratio_curves`: compression ratio against level, one line per MoE layer, one panel per codec,
  with the baselines (`lossless`, `rtn8`, `rtn4`, averaged over layers) as horizontal lines.
"""

from __future__ import annotations

import math
from pathlib import Path

from profiles.fileio import atomic_write_with


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def sensitivity_heatmap(sens, path: str | Path, metric: str = "content") -> Path | None:
    """Write the layer x level heatmap of single-layer, all-expert, real-codec points.

    Returns:
        The path, or None when the table has no such points.
    """
    if sens is None or len(sens) == 0:
        return None
    if "matrix" in sens.columns:   # whole-expert points only
        sens = sens[sens.matrix.isna() | (sens.matrix == "all")]
    rows = sens[(sens.target_kind == "layer") & (sens.surrogate == "none")
                & sens.level.notna() & (sens.experts == sens.experts.mode().iat[0])]
    if len(rows) == 0:
        return None
    rows = rows.assign(layer=rows.layers.astype(str).str.split(",").str[0].astype(int),
                       sig=(rows[f"{metric}_change_low"] > 0) | (rows[f"{metric}_change_high"] < 0))
    agg = rows.groupby(["codec", "layer", "level"]).agg(
        change=(f"{metric}_change", "mean"), sig=("sig", "any")).reset_index()
    agg["change"] = 100 * agg["change"]     # points
    codecs = sorted(agg.codec.unique())
    plt = _plt()
    fig, axes = plt.subplots(1, len(codecs), figsize=(4.2 * len(codecs) + 1, 4.4), squeeze=False,
                             layout="constrained")
    vmax = max(1.0, float(agg.change.abs().max()))
    image = None
    for ax, codec in zip(axes[0], codecs):
        sub = agg[agg.codec == codec]
        layers, levels = sorted(sub.layer.unique()), sorted(sub.level.unique())
        grid = [[math.nan] * len(levels) for _ in layers]
        sig = [[False] * len(levels) for _ in layers]
        for r in sub.itertuples():
            i, j = layers.index(r.layer), levels.index(r.level)
            grid[i][j], sig[i][j] = r.change, bool(r.sig)
        image = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        for i in range(len(layers)):
            for j in range(len(levels)):
                v = grid[i][j]
                if math.isnan(v):
                    continue
                if not sig[i][j]:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                               edgecolor="0.6", linewidth=0))
                ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7,
                        color="black" if sig[i][j] else "0.45")
        ax.set_xticks(range(len(levels)), [f"{v:g}" for v in levels])
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel(f"level ({sens['mode'].dropna().iat[0]})")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{codec}: {metric} accuracy change (points)", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label=f"{metric} change (points, mean over tasks)")
    fig.suptitle("measured; hatched, grey numbers: the paired 95% interval covers 0 for every task",
                 fontsize=8)
    return _save(fig, plt, path)


def ratio_curves(ratios, path: str | Path) -> Path | None:
    """Write ratio-vs-level curves per codec and layer; None without bounded rows."""
    if ratios is None or len(ratios) == 0:
        return None
    if "matrix" in ratios.columns:   # whole-expert ratios only
        ratios = ratios[ratios.matrix.isna() | (ratios.matrix == "all")]
    bounded = ratios[ratios.level.notna()]
    if len(bounded) == 0:
        return None
    codecs = sorted(bounded.codec.unique())
    baselines = ratios[ratios.level.isna()].groupby("codec").ratio.mean()
    plt = _plt()
    fig, axes = plt.subplots(1, len(codecs), figsize=(4.5 * len(codecs), 4.0), squeeze=False,
                             layout="constrained")
    for ax, codec in zip(axes[0], codecs):
        sub = bounded[bounded.codec == codec]
        for layer, grp in sub.groupby("layer"):
            grp = grp.sort_values("level")
            ax.plot(grp.level, grp.ratio, marker="o", markersize=3, linewidth=1,
                    label=f"layer {layer}")
        for name, value in baselines.items():
            ax.axhline(value, linestyle="--", linewidth=0.8, color="0.4")
            ax.text(sub.level.min(), value, f" {name} {value:.2f}x", fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel(f"level ({sub['mode'].iat[0]})")
        ax.set_ylabel("ratio vs checkpoint bytes (measured)")
        ax.set_title(codec, fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
