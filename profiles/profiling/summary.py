"""Plain-text summary tables of a model profile (the CLI renders them; no rich here).

Each function returns `(title, header, rows)` with every cell a string; an empty `rows` means the
profile has nothing for that table. Accuracy changes are shown in points (1 point = 0.01) with the
combined paired interval of the mean over tasks; "Holm" lists the tasks whose change survives a
Holm correction over every (point, task) comparison of the profile.
"""

from __future__ import annotations

import math

from profiles.profiling.metrics import TEXT_ROW
from profiles.profiling.sensitivity import mean_change_interval

Table = tuple[str, list[str], list[list[str]]]


def ratio_table(prof) -> Table:
    """Mean ratio over MoE layers (and its range) per codec and level."""
    from profiles.profiling.format import with_matrix_column

    r = with_matrix_column(prof.ratios)
    header = ["codec", "mode", "level", "matrix", "ratio (mean over layers)", "layer range",
              "max err / bound", "experts sampled"]
    if r is None or len(r) == 0:
        return "compression ratios (measured on the real weights)", header, []
    rows = []
    for (codec, mode, level, matrix), grp in r.groupby(["codec", "mode", "level", "matrix"],
                                                       dropna=False, sort=False):
        worst = grp.max_err_over_bound.max()
        rows.append([codec, mode, "-" if _nan(level) else f"{level:g}", matrix,
                     f"{grp.ratio.mean():.3f}x", f"{grp.ratio.min():.3f}-{grp.ratio.max():.3f}",
                     "-" if _nan(worst) else f"{worst:.3f}",
                     f"{int(grp.n_experts.iat[0])}/{int(grp.n_experts_total.iat[0])}"])
    return ("compression ratios vs checkpoint bytes (measured on the real weights; a matrix row "
            "is against that matrix's share of the expert's bytes)", header, rows)


def sensitivity_table(prof) -> Table:
    """One row per point: mean content and strict change over tasks, KL, Holm verdicts."""
    from profiles.profiling.format import with_matrix_column

    s = with_matrix_column(prof.sensitivity)
    header = ["target", "experts", "matrix", "storage", "content Δ pts [95%]", "strict Δ",
              "KL nats [95%]", "top-1", "Holm"]
    if s is None or len(s) == 0 or prof.doc.get("design") == "paper":
        return "accuracy sensitivity (measured, paired vs the unperturbed model)", header, []
    verdicts = _holm(s)
    rows = []
    keys = ["target", "experts", "codec", "mode", "level", "surrogate", "matrix"]
    for key, grp in s.groupby(keys, dropna=False, sort=False):
        c = mean_change_interval(list(zip(grp.content_change, grp.content_change_low,
                                          grp.content_change_high)))
        st = mean_change_interval(list(zip(grp.strict_change, grp.strict_change_low,
                                           grp.strict_change_high)))
        flags = [f"{task}{'-' if v == 'degraded' else '+'}"
                 for task, v in ((r.task, verdicts[i]) for i, r in zip(grp.index, grp.itertuples()))
                 if v != "no significant change"]
        stopped = " E" if grp.stopped_early.any() else ""
        storage = key[2] + ("" if _nan(key[4]) else f":{key[4]:g}") + \
            ("" if key[5] == "none" else f" ({key[5]})")
        text_only = bool((grp.task == TEXT_ROW).all())
        kl = f"{grp.kl_nats.mean():.3g}"
        if "kl_low" in grp.columns and grp.kl_low.notna().any():
            kl += f" [{grp.kl_low.mean():.3g}, {grp.kl_high.mean():.3g}]"
        rows.append([key[0], key[1], key[6], storage, "-" if text_only else _pts(c) + stopped,
                     "-" if text_only else f"{100 * st[0]:+.1f}", kl,
                     f"{grp.top1_agreement.mean():.3f}", " ".join(flags) or "-"])
    return ("accuracy sensitivity (measured; change vs the unperturbed model in points, mean over "
            "tasks with its 95% paired interval; E = stopped early as catastrophic; Holm: tasks "
            "whose content change survives a Holm correction over the profile, - worse, + better)",
            header, rows)


def paper_table(prof) -> Table:
    """The study's table shape: target x p, strict/content accuracy (mean over tasks), Gaussian
    noise next to the real codec at the same bound."""
    s = prof.sensitivity
    if s is None or len(s) == 0 or prof.doc.get("design") != "paper":
        return "", [], []
    levels = sorted(x for x in s.level.dropna().unique())
    real = next((c for c in s.codec.unique() if c != "noise"), "real")
    header = ["target", "experts"] + [f"p={lv:g} noise | {real}" for lv in levels]
    rows = []
    for (target, experts), grp in s.groupby(["target", "experts"], sort=False):
        row = [target, experts]
        for lv in levels:
            cells = []
            for sur in ("gaussian", "none"):
                sub = grp[(grp.level == lv) & (grp.surrogate == sur)]
                cells.append("n/a" if len(sub) == 0 else
                             f"{sub.strict.mean():.2f}/{sub.content.mean():.2f}")
            row.append(" | ".join(cells))
        rows.append(row)
    base = prof.doc.get("baseline", {})
    if base:
        strict = sum(b["strict"]["value"] for b in base.values()) / len(base)
        content = sum(b["content"]["value"] for b in base.values()) / len(base)
        rows.insert(0, ["baseline", "-"] + [f"{strict:.2f}/{content:.2f}"] * len(levels))
    return ("the study's design: strict/content accuracy (its ICA/PIA), mean over tasks, Gaussian "
            "noise N(0, p*mean|w|) | real codec at bound p*mean|w| (measured)", header, rows)


def _holm(s) -> dict:
    from profiles.evaluation import holm_adjust

    idx = list(s.index)
    adjusted = holm_adjust([float(p) for p in s.content_mcnemar_p])
    out = {}
    for i, p, change in zip(idx, adjusted, s.content_change):
        out[i] = ("degraded" if change < 0 else "improved") if p <= 0.05 and change != 0 \
            else "no significant change"
    return out


def _pts(interval) -> str:
    mean, lo, hi = interval
    return f"{100 * mean:+.1f} [{100 * lo:+.1f},{100 * hi:+.1f}]"


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
