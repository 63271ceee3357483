"""`moesz report DIR`: render a folder of moesz results as markdown and a self-contained HTML page.

The folder is what `moesz demo` writes (any subset works; missing parts are named, not invented):

    DIR/profile/        a model profile (profile.json, ratios/sensitivity/traces parquet)
    DIR/plan.json       a plan (`moesz plan`)
    DIR/sweep.json      a memory-budget sweep (kind `budget_sweep`, rows of `sim.study.StudyRow`)
    DIR/validation.json a validation (`moesz validate --json`, kind `validation`)
    DIR/demo.json       the demo's run record (commands, timings, hardware source)

It writes `DIR/report.md`, its figures under `DIR/report/`, and `DIR/report.html` — the same
markdown rendered by markdown-it (a dependency of rich) with every figure embedded as base64, so the
page can be mailed or attached on its own. Every number is labelled measured, predicted (by which
model) or preset, as in the files it comes from.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pandas as pd

from planner import report_sections as rs
from profiles.errors import MoeszError
from profiles.fileio import atomic_write_text, read_versioned_json
from profiles.policy import PLAN_KIND, PLAN_SCHEMA_VERSION

FIG_DIR = "report"


# file name -> (key, kind, schema version) of the documents a report reads
RESULT_FILES = {"plan.json": ("plan", PLAN_KIND, PLAN_SCHEMA_VERSION),
                "sweep.json": ("sweep", "budget_sweep", 1),
                "validation.json": ("validation", "validation", 1),
                "demo.json": ("demo", "demo_run", 1),
                "throughput.json": ("throughput", "throughput_check", 1)}


def _load_json(path: Path, kind: str, version: int) -> dict:
    """A result document, checked: kind, schema version and the fields the report reads.

    Raises:
        MoeszError: not JSON, another kind or version, or a malformed field (named).
    """
    from planner.plan import plan_from_dict

    doc = read_versioned_json(path, kind, version)
    if kind == PLAN_KIND:
        plan_from_dict(doc, str(path))
    if kind == "budget_sweep":
        from dataclasses import MISSING, fields

        from sim.results import SimResult

        rows = doc.get("rows", [])
        need = ("policy", "cache", "gpu_mem", "host_mem") + tuple(
            f.name for f in fields(SimResult)
            if f.default is MISSING and f.default_factory is MISSING)
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and all(k in r for k in need) for r in rows):
            raise MoeszError(f"{path}: field 'rows' must be a list of simulated runs (policy, "
                             f"cache, gpu_mem, host_mem and every SimResult field); regenerate "
                             f"it with moesz demo")
    return doc


def find_results(root: Path) -> dict:
    """The result files under `root` (itself and one level of sub-folders), each checked."""
    found: dict = {}
    for name, (key, kind, version) in RESULT_FILES.items():
        hits = [root / name] + sorted(root.glob(f"*/{name}"))
        hit = next((h for h in hits if h.is_file()), None)
        if hit is not None:
            found[key] = (hit, _load_json(hit, kind, version))
    prof = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    found["profile"] = next((p for p in prof if (p / "profile.json").is_file()), None)
    return found


def render_report(directory: str | Path) -> tuple[Path, Path]:
    """Write `report.md`, `report/*.png` and `report.html` into `directory`.

    Returns:
        (markdown path, HTML path).

    Raises:
        MoeszError: the folder does not exist or holds none of the result files.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise MoeszError(f"{root}: no such folder; give a folder written by `moesz demo`")
    found = find_results(root)
    if len(found) == 1 and found["profile"] is None:
        raise MoeszError(f"{root}: holds no moesz results (profile/, plan.json, sweep.json, "
                         f"validation.json); run `moesz demo --out {root}` first")
    figs = root / FIG_DIR
    figs.mkdir(exist_ok=True)
    plan = found.get("plan", (None, None))[1]
    val = found.get("validation", (None, None))[1]
    demo = found.get("demo", (None, None))[1]
    sweep = found.get("sweep", (None, None))[1]
    thr = found.get("throughput", (None, None))[1]
    view = rs.plan_view(plan) if plan else None

    md = [f"# moesz report: {rs.model_name(plan, val, demo, found['profile'])}", ""]
    md += rs.header(demo, plan)
    md += rs.summary(view, val, thr, sweep)
    if val:
        md += rs.validation_tasks(val)
    if view:
        md += _plan_section(view, root, figs)
    if sweep:
        md += _sweep_section(sweep, figs)
    if found["profile"] is not None:
        md += _profile_section(found["profile"], figs)
    md += rs.files_section(root)
    text = "\n".join(md) + "\n"
    md_path, html_path = root / "report.md", root / "report.html"
    atomic_write_text(md_path, text)
    atomic_write_text(html_path, to_html(text, root, "moesz report"))
    return md_path, html_path


def _img(name: str, alt: str) -> str:
    return f"![{alt}]({FIG_DIR}/{name})"


def _figure(root: Path, existing: Path, fallback: Path, draw) -> str | None:
    """The figure's path relative to `root`: the one the producing command already wrote, else
    one drawn now into the report folder by `draw(path) -> bool`; None when neither exists."""
    if existing.is_file():
        return existing.relative_to(root).as_posix()
    if draw(fallback):
        return fallback.relative_to(root).as_posix()
    return None


def _plan_section(view: dict, root: Path, figs: Path) -> list[str]:
    from planner.plots import plot_levels, plot_pareto

    md = rs.plan_tables(view)
    name = view["model"].get("geometry_name", "model")
    levels = _figure(root, root / "plan-plots" / "levels.png", figs / "plan_levels.png",
                     lambda p: bool(view["layers"]) and plot_levels(
                         p, view["layers"], f"{name}: planned level per MoE layer (budget "
                                            f"{view['budget']:g})") is not None)
    if levels:
        md += [f"![level per layer]({levels})", ""]
    pareto = root / "plan-plots" / "pareto.png"
    if pareto.is_file():  # drawn by `moesz plan` / the demo from every trial of the study
        md += ["Every trial of the plan's search (predicted tokens/s against predicted drop), "
               "the feasible Pareto front, the baselines and the plan.", "",
               f"![Pareto front]({pareto.relative_to(root).as_posix()})", ""]
    elif view["drop"] is not None and view["predicted"].get("tokens_per_s_closed_form"):
        trials = [(p["accuracy_drop"], p["tokens_per_s"], True) for p in view["pareto"]
                  if p.get("accuracy_drop") is not None and p.get("tokens_per_s") is not None]
        bases = [(b["name"], b["drop"], b["tokens_per_s"]) for b in view["baselines"]
                 if b["drop"] is not None and b["tokens_per_s"] is not None]
        plot_pareto(figs / "pareto.png", trials, bases,
                    (view["drop"].value, view["predicted"]["tokens_per_s_closed_form"]),
                    view["budget"], view["metric"], f"{name}: Pareto front kept in the plan file")
        md += [_img("pareto.png", "Pareto front"), ""]
    budget_plot = root / "plan-plots" / "budget.png"
    if budget_plot.is_file():
        md += ["Predicted tokens/s of the per-layer plan (exact MILP) and of the best uniform "
               "level at other accuracy budgets (same profile and cost model).", "",
               f"![throughput against budget]({budget_plot.relative_to(root).as_posix()})", ""]
    return md


def _sweep_section(sweep: dict, figs: Path) -> list[str]:
    from dataclasses import fields

    from sim.plots import plot_budget_sweep
    from sim.results import SimResult
    from sim.study import StudyRow

    rows = sweep.get("rows") or []
    md = ["## Memory-budget sweep (predicted)", "", rs.esc(sweep.get("description", "")), ""]
    if not rows:
        return md + ["The sweep file holds no runs.", ""]
    names = [f.name for f in fields(SimResult)]
    study_rows = [StudyRow({k: r[k] for k in ("policy", "cache", "gpu_mem", "host_mem")},
                           SimResult(**{k: r[k] for k in names if k in r}),
                           r.get("closed_form_tokens_per_s")) for r in rows]
    plot_budget_sweep(figs / "budget_sweep.png", study_rows,
                      f"predicted decode tokens/s against the GPU budget ({sweep.get('hardware')})")
    md += [_img("budget_sweep.png", "memory-budget curves"), ""]
    md += [f"- {rs.esc(x)}" for x in sweep.get("skipped") or []]
    return md + [""] + rs.sweep_table(rows)


def _profile_section(pdir: Path, figs: Path) -> list[str]:
    from profiles.profiling import format as fmt

    doc = _load_json(pdir / fmt.PROFILE_FILE, fmt.KIND, fmt.SCHEMA_VERSION)
    md = ["## Model profile (measured)", ""] + rs.profile_facts(doc, pdir)
    from profiles.profiling.plots import ratio_curves, sensitivity_heatmap

    root = figs.parent
    sens_path, ratio_path = pdir / "sensitivity.parquet", pdir / "ratios.parquet"
    heat = _figure(root, pdir / "plots" / "sensitivity_content.png", figs / "sensitivity.png",
                   lambda p: sens_path.is_file() and sensitivity_heatmap(
                       pd.read_parquet(sens_path), p) is not None)
    if heat:
        md += ["Measured change of content accuracy (points, averaged over tasks) when one "
               "layer's experts go through a real codec round trip, on the `profile` split. "
               "Hatched cells: the paired 95 % interval covers zero.", "",
               f"![sensitivity heatmap]({heat})", ""]
    curves = _figure(root, pdir / "plots" / "ratios.png", figs / "ratios.png",
                     lambda p: ratio_path.is_file() and ratio_curves(
                         pd.read_parquet(ratio_path), p) is not None)
    if curves:
        md += ["Measured compression ratios of each layer's expert tensors (against the "
               "checkpoint's bytes, headers counted).", "", f"![ratio curves]({curves})", ""]
    return md


_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem}th{background:#f3f3f3}img{max-width:100%}
code,pre{background:#f6f6f6;font-size:.85rem}pre{padding:.5rem;overflow-x:auto}"""


def to_html(markdown: str, base: Path, title: str) -> str:
    """Markdown to one HTML page; every local PNG referenced is embedded as a base64 data URI."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def embed(m: re.Match) -> str:
        src = html.unescape(m.group(1))
        path = base / src
        if src.startswith(("data:", "http:", "https:")) or not path.is_file():
            return m.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body>\n{body}</body></html>\n")
