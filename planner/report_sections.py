"""The report's text: markdown sections built from the result documents (see `planner.report`).

Pure functions from loaded JSON/parquet data to lists of markdown lines. Each table column says
whether its figures are measured, predicted (and by which model) or preset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from planner.verdict import Interval

_FILE_NOTES = {
    "profile.json": "model profile metadata (measured)",
    "ratios.parquet": "compression ratio per layer x codec x level (measured)",
    "sensitivity.parquet": "accuracy change per target x codec x level x task (measured)",
    "traces.parquet": "routing traces of the profile split (measured)",
    "sweep.db": "Optuna storage of the sensitivity sweep",
    "baseline.json": "the unperturbed model's answers on the profile split (measured, cached)",
    "plan.json": "the plan: policy, serving configuration, predictions, baselines",
    "plan.db": "Optuna storage of the plan search",
    "sweep.json": "memory-budget sweep (predicted by the simulator)",
    "validation.json": "validation on the held-out split (measured vs predicted)",
    "demo.json": "the demo's run record (commands, timings)",
    "timeline.json": "simulated timeline, Chrome trace format (open in https://ui.perfetto.dev)",
    "throughput.json": "simulator vs runtime throughput (predicted vs measured)",
    "hardware.json": "hardware profile used",
    "report.md": "this report",
    "report.html": "this report, self-contained HTML",
}


def esc(text) -> str:
    return str(text).replace("|", "\\|")


def pct(x: float | None, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x * 100:+.2f}" if sign else f"{x * 100:.1f}"


def to_interval(d: dict) -> Interval:
    """An `Interval` from `{value, low, high}` plus `method` (or a plan's `kind` / `interval`)."""
    method = d.get("method") or " ".join(str(d[k]) for k in ("kind", "interval") if d.get(k)) \
        or "unknown"
    return Interval(float(d["value"]), float(d["low"]), float(d["high"]), method)


def iv_text(d, scale: float = 100.0, unit: str = " pts", digits: int = 2) -> str:
    """`+0.50 [−1.20, +2.10] pts` from an interval dict or `Interval`."""
    if d is None:
        return "n/a"
    iv = d if isinstance(d, Interval) else to_interval(d)
    f = f"+.{digits}f"
    return f"{iv.value * scale:{f}} [{iv.low * scale:{f}}, {iv.high * scale:{f}}]{unit}"


def iv_sig(d, unit: str = "", digits: int = 3) -> str:
    """`+1.23e-05 [+1.1e-05, +1.4e-05] nats`: an interval with significant digits, for metrics
    (KL, perplexity ratio) whose values span orders of magnitude."""
    if d is None:
        return "n/a"
    iv = d if isinstance(d, Interval) else to_interval(d)
    f = f"+.{digits}g"
    return f"{iv.value:{f}} [{iv.low:{f}}, {iv.high:{f}}]{unit}"


def model_name(plan, val, demo, profile_dir) -> str:
    for doc in (demo, val):
        if doc and isinstance(doc.get("model"), dict) and doc["model"].get("spec"):
            return str(doc["model"]["spec"])
    if plan and isinstance(plan.get("model"), dict):
        return str(plan["model"].get("spec") or plan["model"].get("name") or "model")
    if profile_dir is not None:
        try:
            return str(json.loads((profile_dir / "profile.json").read_text())["model"]["spec"])
        except (KeyError, TypeError, ValueError, OSError):
            pass
    return "results"


def header(demo, plan) -> list[str]:
    md = []
    if demo:
        md += [f"Made by `{esc(demo.get('command', 'moesz demo'))}` on {demo.get('created_utc', '?')} "
               f"({demo.get('host', '?')}; {demo.get('wall_s', 0):.0f} s wall, measured).", ""]
        hw = demo.get("hardware") or {}
        if hw:
            md += [f"**Hardware:** `{esc(hw.get('spec'))}` — {esc(hw.get('note', ''))}", ""]
        for note in demo.get("notes", []):
            md += [f"- warning: {esc(note)}"]
        md += [""] if demo.get("notes") else []
    elif plan and plan.get("hardware"):
        md += [f"**Hardware:** `{esc((plan['hardware'] or {}).get('source'))}`", ""]
    return md


def plan_view(plan: dict) -> dict:
    """The plan fields the report shows, from a plan document (`planner.plan`, docs/planning.md)."""
    pred = plan.get("predicted") or {}
    budget = plan.get("budget") or {}
    baselines = []
    for b in plan.get("baselines") or []:
        bd = b.get("accuracy_drop")
        baselines.append({"name": b.get("label") or b.get("name", "?"), "policy": b.get("policy"),
                          "tokens_per_s": b.get("tokens_per_s"),
                          "tokens_per_s_simulation": b.get("tokens_per_s_simulation"),
                          "drop_iv": bd, "drop": (bd or {}).get("value"),
                          "feasible": b.get("meets_budget"), "note": b.get("note", "")})
    drop = pred.get("accuracy_drop")
    return {"layers": plan.get("layers") or [], "predicted": pred,
            "tokens_per_s": pred.get("tokens_per_s"),
            "drop": to_interval(drop) if isinstance(drop, dict) else None,
            "budget": budget.get("value"), "metric": budget.get("metric", "content"),
            "baselines": baselines, "pareto": plan.get("pareto") or [],
            "serving": plan.get("serving") or {}, "milp": plan.get("milp") or {},
            "search": plan.get("search") or {}, "warnings": plan.get("warnings") or [],
            "hardware": plan.get("hardware") or {}, "model": plan.get("model") or {}}


def summary(view, val, thr, sweep) -> list[str]:
    md = ["## Predicted against measured", "",
          "| figure | predicted | measured |", "|---|---|---|"]
    if view and view["drop"] is not None or val:
        metric = (view or {}).get("metric") or (val or {}).get("metric", "content")
        text = metric in ("kl", "ppl")
        fmt = (lambda d: iv_sig(d, " nats" if metric == "kl" else "")) if text else \
            (lambda d: iv_text(d, 100.0, " pts", 2))
        pred = fmt(view["drop"]) if view and view["drop"] else "n/a"
        meas = fmt((val or {}).get("measured", {}).get("accuracy_drop")) if val else \
            "not validated"
        what = {"kl": "mean KL(base ‖ plan), nats per token", "ppl": "perplexity ratio − 1",
                "content": "content accuracy drop, mean over tasks",
                "strict": "strict accuracy drop, mean over tasks"}.get(
            metric, f"{metric} content accuracy drop")
        kind = str((view or {}).get("predicted", {}).get("accuracy_drop", {}).get("kind", ""))
        how = ("measured on the `profile` split, whole policy" if kind.startswith("measured")
               else "additive accuracy model, `profile` split")
        md.append(f"| {what} (95 % interval) | {pred} ({how}) "
                  f"| {meas} ({'bootstrap over text sequences' if text else 'paired'},"
                  f" `{(val or {}).get('split', 'validate')}` split) |")
    if val:
        v = val.get("verdict", "?")
        md.append(f"| verdict against the budget {view['budget'] if view else val.get('budget')} "
                  f"| — | **{v}** |")
        m, p = val.get("measured", {}), val.get("predicted", {})
        if m.get("stored_bytes") is not None:
            pb, mb = p.get("host_mem_bytes"), m["stored_bytes"]
            diff = f"; {(mb - pb) / pb * 100:+.1f} % vs predicted" if pb else ""
            md.append(f"| stored expert bytes (host memory) | {_exact(pb)} (the profile's ratios, "
                      f"sampled experts) | {_exact(mb)} (every expert encoded{diff}) |")
    if view and view["tokens_per_s"] is not None:
        p = view["predicted"]
        parts = [(p.get("tokens_per_s_simulation"), "simulation"),
                 (p.get("tokens_per_s_closed_form"), "closed form")]
        text = ", ".join(f"{v:.1f} ({k})" for v, k in parts if isinstance(v, (int, float))) \
            or f"{view['tokens_per_s']:.1f}"
        meas = "not measured here (needs the runtime on a GPU: `moesz validate --throughput`)"
        if thr and thr.get("measured", {}).get("tokens_per_s") is not None:
            meas = f"{thr['measured']['tokens_per_s']:.1f} ({thr['measured'].get('where', 'runtime')})"
        md.append(f"| decode tokens/s at the plan's budget | {text} | {meas} |")
    return md + [""]


def _exact(n) -> str:
    return "n/a" if n is None else f"{_bytes(n)} ({int(n):,} B)"


def _bytes(n) -> str:
    from profiles.serving import format_bytes

    return "n/a" if n is None else format_bytes(n)


def validation_tasks(val: dict) -> list[str]:
    m = val.get("measured", {})
    md = ["## Validation per task (measured)", "",
          f"Split `{val.get('split')}`, {val.get('n_prompts', '?')} prompts; policy applied with "
          f"real codec round trips. Change = plan minus unperturbed model on the same prompts, "
          f"95 % paired interval ({esc(m.get('interval_method', 'newcombe'))}); p = exact McNemar.",
          "", "| task | n | strict base → plan | strict change | p | content base → plan | "
          "content change | p |", "|---|--:|---|---|--:|---|---|--:|"]
    for task, t in (m.get("tasks") or {}).items():
        md.append(f"| {task} | {t['n']} | {pct(t['base']['strict']['value'], False)} → "
                  f"{pct(t['plan']['strict']['value'], False)} % | {iv_text(t['strict_change'])} | "
                  f"{t['strict_mcnemar_p']:.3g} | {pct(t['base']['content']['value'], False)} → "
                  f"{pct(t['plan']['content']['value'], False)} % | "
                  f"{iv_text(t['content_change'])} | {t['content_mcnemar_p']:.3g} |")
    detail = val.get("verdict_detail") or {}
    md += ["", f"**Verdict: {val.get('verdict')}** — {esc(detail.get('reason', ''))}", ""]
    return md


def plan_tables(view: dict) -> list[str]:
    md = ["## The plan (predicted)", ""]
    sv, hw = view["serving"], view["hardware"]
    gpu = sv.get("gpu_mem_bytes") or (f"non-expert weights + KV cache + "
                                      f"{sv['gpu_mem_fraction']:.0%} of routed-expert bytes"
                                      if sv.get("gpu_mem_fraction") is not None else "unlimited")
    md += [f"Budget: {view['metric']} accuracy drop ≤ {view['budget']:g} (one-sided upper bound, "
           f"mean over tasks). Serving: GPU {gpu}, cache {sv.get('cache_policy')}, prefetch "
           f"{sv.get('prefetch')}, batch {sv.get('batch_size')}, {sv.get('generated_tokens')} "
           f"generated tokens. Hardware `{esc(hw.get('source'))}`.", ""]
    md += [f"- warning: {esc(w)}" for w in view["warnings"]]
    md += [""] if view["warnings"] else []
    if view["layers"]:
        md += ["| MoE layer | storage | ratio (measured) | predicted drop (points) |",
               "|--:|---|--:|--:|"]
        for d in view["layers"]:
            drop = d.get("drop")
            md.append(f"| {d['layer']} | {d.get('spec') or d.get('codec')} | "
                      f"{d.get('ratio', float('nan')):.2f} | "
                      f"{'n/a' if drop is None else f'{drop * 100:+.2f}'} |")
        md.append("")
    milp, search = view["milp"], view["search"]
    if milp.get("tokens_per_s") is not None:
        cold = search.get("cold_start") or {}
        gap = cold.get("gap_to_milp")
        md += [f"Exact MILP optimum (closed form): {milp['tokens_per_s']:.1f} tokens/s "
               f"(certified: {milp.get('certified')}); Optuna from a cold start reached "
               + ("n/a" if gap is None else f"{gap * 100:.2f} % below it")
               + f" in {cold.get('trials')} trials.", ""]
    if view["baselines"]:
        md += ["| policy | tokens/s (predicted, closed form) | accuracy drop (predicted) | "
               "meets budget |", "|---|--:|---|---|"]
        p = view["predicted"]
        if p.get("tokens_per_s_closed_form") is not None:
            md.append(f"| **plan** | {p['tokens_per_s_closed_form']:.1f} | {iv_text(view['drop'])} "
                      f"| yes |")
        milp = view["milp"]
        if milp.get("tokens_per_s") is not None and milp.get("layers"):
            md.append(f"| per-layer optimum of the codecs searched (MILP: "
                      f"{esc(_grouped(milp['layers']))}) | {milp['tokens_per_s']:.1f} | "
                      f"{iv_text(milp.get('accuracy_drop'))} | yes |")
        for b in view["baselines"]:
            tps = "n/a" if b["tokens_per_s"] is None else f"{b['tokens_per_s']:.1f}"
            drop = iv_text(b["drop_iv"]) if isinstance(b["drop_iv"], dict) else "n/a"
            feas = {True: "yes", False: "no", None: "—"}[b["feasible"]]
            note = f" ({esc(b['note'])})" if b["note"] and b["tokens_per_s"] is None else ""
            md.append(f"| {esc(b['name'])}{note} | {tps} | {drop} | {feas} |")
        md.append("")
    return md


def _grouped(specs: list[str]) -> str:
    """`raw on 0, 2; szp:meanabs:2 on 1, 3-5` from one spec per MoE layer position."""
    by: dict[str, list[int]] = {}
    for pos, spec in enumerate(specs):
        by.setdefault(spec, []).append(pos)
    return "; ".join(f"{spec} on {', '.join(map(str, ps))}" for spec, ps in by.items())


def sweep_table(rows: list[dict]) -> list[str]:
    md = ["| policy | GPU budget | tokens/s (simulation) | tokens/s (closed form) | hit rate | "
          "bytes host→GPU |", "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        cf = r.get("closed_form_tokens_per_s")
        md.append(f"| {esc(r['policy'])} | {esc(r.get('gpu_mem', ''))} = "
                  f"{_bytes(r.get('gpu_budget_bytes'))} | "
                  f"{r['tokens_per_s']:.1f} | {'n/a' if cf is None else f'{cf:.1f}'} | "
                  f"{r['hit_rate']:.2f} | {_bytes(r['bytes_h2d'])} |")
    return md + ["", "All figures predicted (moesz discrete-event simulator; closed form alongside)."
                 , ""]


def profile_facts(doc: dict, pdir: Path) -> list[str]:
    model = doc.get("model") or {}
    md = [f"`{pdir.name}/`: model `{model.get('spec')}`, fingerprint `{model.get('fingerprint')}`; "
          f"split `{doc.get('split')}`, {doc.get('prompts_per_task')} prompts per task, tasks "
          f"{', '.join(doc.get('tasks') or [])}; codecs {', '.join(doc.get('codecs') or [])}, "
          f"levels {', '.join(f'{x:g}' for x in doc.get('levels') or [])}.", ""]
    dl = doc.get("detection_limit")
    if isinstance(dl, dict) and dl.get("half_width") is not None:
        md += [f"Smallest detectable change at this sample size (half-width of a typical paired "
               f"interval, {dl.get('metric')}): {dl['half_width'] * 100:.2f} points.", ""]
    return md


def files_section(root: Path) -> list[str]:
    md = ["## Files in this folder", "", "| file | bytes | what |", "|---|--:|---|"]
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = p.relative_to(root).as_posix()
            note = _FILE_NOTES.get(p.name, "figure" if p.suffix == ".png" else "")
            if rel.startswith("cache/baseline-"):
                note = "the unperturbed model's answers on the validate split (measured, cached)"
            md.append(f"| `{rel}` | {p.stat().st_size} | {note} |")
    return md + [""]
