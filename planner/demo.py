"""`moesz demo`: the whole chain on the built-in model, into one report folder.

1. hardware: measured when a CUDA GPU is present, else the shipped `preset:h200-published`
   (published figures, labelled so in every output);
2. profile the built-in model on a small grid (`profiles.profiling.profile_model`): compression
   ratios of every MoE layer, per-layer sensitivity on the `profile` split, next-token KL,
   top-1 agreement and perplexity ratio on the text corpus shipped with the package
   (`profiles/builtin/corpus.txt`, its profile half), routing traces, and the formats users
   run (`USER_FORMATS`: NF4, MXFP4, Q4_K, Q3_K) measured on the whole model as baselines;
3. plan for a one-point content budget under a GPU memory budget that forces cache misses — the
   non-expert weights and KV cache plus a fraction of the routed-expert bytes
   (`planner.pipeline.make_plan`), its best candidates measured for real on the profile split
   (`--verify`, `planner.verify`);
4. the memory-budget sweep: the plan, no compression, the best uniform level, rtn8 and rtn4
   simulated across GPU budgets on the profile's traces (`sim.study.run_study`), and the plan's
   simulated timeline as a Perfetto trace;
5. validate the plan for real on the held-out `validate` split (`planner.validate`);
6. on a machine without a GPU, serve the plan and no compression with the real runtime on this
   CPU, experts beyond a host budget read from disk, beside the simulator's prediction for this
   machine (a profile measured and calibrated here) and for the H200 preset
   (`planner.throughput.this_machine`);
7. render the report (`planner.report.render_report`).

`size="ci"` shrinks every step (two layers, one level, eight prompts per task, few trials) so the
chain runs end to end in tests; its figures demonstrate the plumbing, not the model.
"""

from __future__ import annotations

import json
import platform
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from profiles.errors import ConfigError, MoeszError
from profiles.fileio import atomic_write_json

Progress = Callable[[int, int, str], None]
PRESET = "preset:h200-published"
STAGES = ("hardware", "profile", "plan", "sweep", "validate", "this machine", "report")


@dataclass(frozen=True)
class DemoSize:
    """How much work each step does."""

    layers: str            # MoE layers profiled ("all" or a list)
    levels: str            # szp meanabs levels profiled
    groups: str            # multi-layer groups (for the planner's additivity fit)
    profile_limit: int     # prompts per task on the profile split
    validate_limit: int    # prompts per task on the validate split
    trials: int            # Optuna trials (cold start)
    warm_trials: int
    tokens: int            # generated tokens per sequence in the simulations
    sweep_fractions: tuple[str, ...]
    budget: float          # content accuracy drop, averaged over tasks
    verify: int = 3        # candidates measured for real before the plan is chosen
    # a quarter of the shipped corpus's profile half: the KL of every point at about twice the
    # interval of the full default budget, for a quarter of its cost
    text_tokens: int | None = 16384


SIZES = {
    # one point of content accuracy: the profile needs ~300 prompts per task to resolve it
    "default": DemoSize("all", "1,2", "thirds", 300, 300, 150, 20, 128,
                        ("5%", "10%", "25%", "50%", "100%"), 0.01),
    # 8 prompts per task cannot resolve one point (a single layer's predicted drop has an upper
    # bound near 0.14), so the smoke run plans for a budget it can meet
    "ci": DemoSize("0,7", "1", "none", 8, 8, 12, 4, 16, ("10%", "25%", "100%"), 0.3, 2, 600),
}
GPU_FRACTION = "25%"   # of the routed-expert bytes, on top of non-expert weights and KV cache
# the formats users run, measured on the whole model (one point each) as baselines beside the plan
USER_FORMATS = "nf4,mxfp4,q4_k,q3_k"


@dataclass(frozen=True)
class DemoMetrics:
    """What the demo measures the built-in model with, beyond its tasks, and the budget's metric
    (docs/metrics.md): `text` replaces the shipped corpus, `bench` adds JSONL benchmarks."""

    text: str | None = None
    bench: tuple[str, ...] = ()
    budget: str | None = None   # METRIC=X; default content at the size's budget
    lm_eval: str | None = None  # refused: the built-in model cannot run lm-eval tasks

    def resolved_budget(self, sz: "DemoSize") -> tuple[str, float]:
        """(metric, value), checked before any work: the metric must be one the demo's profile
        will have (content, strict, kl, ppl, a built-in task or a --bench file's stem)."""
        from planner.budget import budget_value, parse_budget
        from profiles.profiling.metrics import AGGREGATE_METRICS
        from profiles.tasks import TASKS

        if self.budget is None:
            return "content", sz.budget
        metric, value = parse_budget(self.budget)
        have = list(AGGREGATE_METRICS) + list(TASKS) + [Path(b).stem for b in self.bench]
        if metric not in have:
            raise ConfigError(f"--budget {self.budget}: the demo's profile will not have metric "
                              f"{metric!r}; it will have {', '.join(have)}")
        budget_value(value, metric)   # a bad number fails here, not after the profile
        return metric, float(value)


def run_demo(out_dir: str | Path, progress: Progress | None = None, size: str = "default",
             hardware: str | None = None, metrics: DemoMetrics = DemoMetrics()) -> dict:
    """Run the demo into `out_dir` and return its record (also written as `demo.json`).

    Args:
        out_dir: the report folder (created; a previous demo's profile there is resumed).
        progress: `progress(done, total, label)`; labels start with the stage name.
        size: `default` (a few minutes on 2 CPU cores) or `ci` (tests).
        hardware: a hardware profile to use instead of measuring / the preset.
        metrics: a text, benchmarks and a budget naming its metric (default: the shipped
            corpus, the built-in tasks, a content budget).

    Returns:
        The demo record: stages with their wall-clock seconds, the headline figures (each
        labelled measured / predicted / preset) and the files written.

    Raises:
        ConfigError: an unknown size, an output path that is a file, a budget on a metric the
            profile will not have, or a bad text or benchmark file.
    """
    if size not in SIZES:
        raise ConfigError(f"demo size {size!r} is unknown; choose {' or '.join(SIZES)}")
    from profiles.profiling.metrics import eval_spec
    from profiles.tasks import TASKS

    if metrics.lm_eval:
        raise ConfigError(f"--lm-eval {metrics.lm_eval}: the demo runs the built-in model, whose "
                          f"character tokenizer cannot run lm-evaluation-harness tasks; profile "
                          f"your own checkpoint with `moesz profile model DIR --lm-eval "
                          f"{metrics.lm_eval}`, or give the demo the questions as --bench FILE")
    metric, budget = metrics.resolved_budget(SIZES[size])
    eval_spec(list(TASKS), metrics.bench, text=metrics.text)  # bad files fail before any work
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    sz, t_start, timings = SIZES[size], time.perf_counter(), {}
    stage = _StageProgress(progress)

    def timed(name, fn):
        t = time.perf_counter()
        stage.begin(name)
        result = fn()
        timings[name] = round(time.perf_counter() - t, 2)
        return result

    hw_spec, hw_note = timed("hardware", lambda: _hardware(out, hardware, stage))
    profile = timed("profile", lambda: _profile(out, sz, stage, metrics))
    outcome = timed("plan", lambda: _plan(out, sz, hw_spec, stage, metric, budget))
    sweep = timed("sweep", lambda: _sweep(out, sz, hw_spec, outcome, stage))
    val = timed("validate", lambda: _validate(out, sz, stage))
    here = timed("this machine", lambda: _this_machine(out, sz, outcome, stage))
    record = _record(out, size, sz, hw_spec, hw_note, profile, outcome, sweep, val, timings,
                     t_start)
    if here is not None:
        record["this_machine"] = here
    atomic_write_json(out / "demo.json", record)
    timed("report", lambda: _report(out))
    record["stages_s"] = timings
    record["wall_s"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(out / "demo.json", record)
    from planner.report import render_report

    render_report(out)  # once more, so the report lists its own files and the final timings
    return record


class _StageProgress:
    """Prefix each stage's progress labels with `[k/6] stage:`."""

    def __init__(self, progress: Progress | None):
        self.progress, self.name = progress, ""

    def begin(self, name: str) -> None:
        self.name = name
        self(0, 1, "starting")

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.progress is not None:
            k = STAGES.index(self.name) + 1
            self.progress(done, total, f"[{k}/{len(STAGES)}] {self.name}: {label}")


def _hardware(out: Path, hardware: str | None, stage) -> tuple[str, str]:
    import torch

    if hardware:
        from profiles.hardware import load_hardware

        load_hardware(hardware)  # a bad file fails here, before minutes of profiling
        return hardware, f"given by the caller ({hardware})"
    if torch.cuda.is_available():
        from profiles.hardware import save_hardware
        from profiles.hardware.measure import measure_hardware

        path = out / "hardware.json"
        hw = measure_hardware("builtin", command="moesz demo", progress=stage)
        save_hardware(hw, path)
        return str(path), f"measured on this machine ({hw.gpu.name if hw.gpu else 'GPU'})"
    return PRESET, ("no CUDA GPU here: throughput predictions use the shipped preset "
                    "preset:h200-published (published H200 / PCIe Gen5 figures, not measured "
                    "on this machine)")


def _profile(out: Path, sz: DemoSize, stage, metrics: DemoMetrics):
    from profiles.profiling import ProfileRequest, profile_model

    from profiles.evaluation.textmetrics import builtin_corpus_path
    from profiles.tasks import TASKS

    req = ProfileRequest(model="builtin", out=out / "profile", codecs="szp",
                         baselines=USER_FORMATS, mode="meanabs",
                         levels=sz.levels, layers=sz.layers, groups=sz.groups,
                         limit=sz.profile_limit, command="moesz demo (profile step)",
                         text=metrics.text or str(builtin_corpus_path()),
                         text_tokens=sz.text_tokens, tasks=",".join(TASKS), bench=metrics.bench)
    return profile_model(req, progress=stage)


def _plan(out: Path, sz: DemoSize, hw_spec: str, stage, metric: str, budget: float):
    from planner.pipeline import PlanRequest, make_plan, write_plots
    from profiles.serving import ServingConfig, parse_mem

    serving = ServingConfig(generated_tokens=sz.tokens, prompt_tokens=16).with_budgets(
        parse_mem(GPU_FRACTION, what="demo GPU budget"), None)
    req = PlanRequest(profile=str(out / "profile"), hardware=hw_spec, budget=budget,
                      serving=serving, metric=metric, trials=sz.trials,
                      warm_trials=sz.warm_trials, seed=0, command="moesz demo (plan step)",
                      verify=sz.verify)
    outcome = make_plan(req, out=str(out / "plan.json"), progress=stage)
    write_plots(outcome, out / "plan-plots")
    return outcome


def _sweep(out: Path, sz: DemoSize, hw_spec: str, outcome, stage) -> dict:
    from profiles.hardware import load_hardware
    from profiles.serving import parse_mem
    from sim.engine import SimOptions
    from sim.study import load_model_source, run_study
    from sim.timeline import spans_of, write_chrome_trace

    hw = load_hardware(hw_spec)
    source = load_model_source(str(out / "profile"))
    serving = outcome.plan.serving
    budgets = [parse_mem(f, what="sweep budget") for f in sz.sweep_fractions]
    policies = [("plan", outcome.plan.policy)]
    for b in outcome.baselines:
        if b.policy is not None and (b.name in ("no compression", "rtn8", "rtn4")
                                     or (b.name.startswith("uniform") and b.feasible)
                                     or (b.name.startswith("uniform ") and b.name[8:].split(
                                         ",")[0] in USER_FORMATS.split(","))):
            policies.append((b.name, b.policy))
    rows, done, skipped = [], 0, []
    for label, policy in policies:
        record = label == "plan"
        try:
            study = run_study(hardware=hw, source=source, policy=policy, policy_label=label,
                              serving=serving, gpu_budgets=budgets,
                              options=SimOptions(record=record))
        except MoeszError as exc:  # e.g. a baseline codec the profile has no ratio for
            if record:
                raise
            skipped.append(f"{label} not simulated: {exc}")
            continue
        rows += [r.to_dict() for r in study.rows]
        if record:  # the first run of the plan: at the smallest budget, the most traffic
            write_chrome_trace(out / "timeline.json", spans_of(study.first_simulation),
                               {"policy": "plan", "gpu_mem": str(budgets[0]),
                                "hardware": hw_spec, "prediction": "moesz simulator"})
        done += 1
        stage(done, len(policies), f"simulated {label}")
    doc = {"kind": "budget_sweep", "schema_version": 1, "hardware": hw_spec,
           "description": (f"Predicted decode tokens/s of the plan and the baselines against the "
                           f"GPU memory budget (non-expert weights and KV cache plus the given "
                           f"share of routed-expert bytes), batch {serving.batch_size}, "
                           f"{serving.generated_tokens} generated tokens, LRU cache, on "
                           f"{hw_spec}, replaying the profile's routing traces."),
           "fractions": list(sz.sweep_fractions), "rows": rows, "skipped": skipped}
    atomic_write_json(out / "sweep.json", doc)
    return doc


def _validate(out: Path, sz: DemoSize, stage) -> dict:
    from planner.validate import validate_plan

    doc = validate_plan(out / "plan.json", limit=sz.validate_limit, cache_dir=out / "cache",
                        progress=stage)
    atomic_write_json(out / "validation.json", doc)
    return doc


def _this_machine(out: Path, sz: DemoSize, outcome, stage) -> dict | None:
    """Without a GPU: the plan and no compression measured on this CPU with the disk tier forced,
    beside the prediction for this machine and the preset's for an H200
    (`planner.throughput.this_machine`)."""
    import torch

    if torch.cuda.is_available():
        return None
    from planner.throughput import this_machine

    doc = this_machine("builtin", outcome.plan.policy, out, preset=PRESET,
                       tokens=8 if sz is SIZES["ci"] else 32, progress=stage)
    atomic_write_json(out / "this-machine.json", doc)
    return doc


def _report(out: Path) -> None:
    from planner.report import render_report

    render_report(out)


def _record(out, size, sz, hw_spec, hw_note, profile, outcome, sweep, val, timings,
            t_start) -> dict:
    import torch

    plan = outcome.plan.doc
    return {
        "kind": "demo_run", "schema_version": 1, "size": size, "settings": asdict(sz),
        "command": f"moesz demo --out {out}" + ("" if size == "default" else f" --size {size}"),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": f"{socket.gethostname()}, {platform.processor() or platform.machine()}, "
                f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
        "model": {"spec": "builtin", "fingerprint": plan["model"]["fingerprint"]},
        "hardware": {"spec": hw_spec, "note": hw_note},
        "budget": plan["budget"], "gpu_budget": f"{GPU_FRACTION} of routed-expert bytes",
        "profile": {"points_done": profile.points_done, "points_total": profile.points_total,
                    "detection_limit": profile.profile.detection_limit},
        "notes": ([] if size == "default" else [
            f"{size} size: {sz.profile_limit} prompts per task cannot resolve a one-point "
            f"budget, so this run plans for {sz.budget:g}; its figures show the chain works, "
            f"not what the model tolerates"]),
        "stages_s": timings, "wall_s": round(time.perf_counter() - t_start, 2),
        "verdict": val["verdict"],
    }


def summary_lines(record: dict, out: Path) -> list[str]:
    """The short, labelled summary `moesz demo` prints."""
    from planner.report_sections import iv_text

    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    val = json.loads((out / "validation.json").read_text())
    p, m = plan["predicted"], val["measured"]
    base = {b["name"]: b for b in plan["baselines"]}
    lines = [f"moesz demo: built-in model, {record['size']} size, {record['wall_s']:.0f} s "
             f"(measured wall clock)",
             f"hardware: {record['hardware']['spec']} — {record['hardware']['note']}",
             f"plan: budget {plan['budget']['metric']} drop <= {plan['budget']['value']:g} "
             f"({plan['budget'].get('unit', 'fraction of prompts')}), GPU budget "
             f"{record['gpu_budget']}",
             "  layers: " + _grouped(plan["layers"]),
             f"  decode tokens/s, predicted: plan {_num(p.get('tokens_per_s_simulation'))} "
             f"(simulation), {_num(p.get('tokens_per_s_closed_form'))} (closed form)"]
    users = [b for name, b in base.items() if name.startswith("uniform ")
             and name[8:].split(",")[0] in USER_FORMATS.split(",")]
    for name, b in base.items():
        if b["tokens_per_s"] is not None and (name in ("no compression", "rtn8", "rtn4")
                                              or name.startswith("uniform")) \
                and not any(b is u for u in users):
            lines.append(f"    {b.get('label', name)}: {b['tokens_per_s']:.1f} (closed form)"
                         + ("" if b.get("meets_budget") else ", over the accuracy budget"))
    milp = plan.get("milp") or {}
    if milp.get("tokens_per_s") is not None and milp.get("layers") and \
            [x.get("spec") for x in plan["layers"]] != milp["layers"]:
        lines.append(f"    per-layer optimum of {', '.join(plan.get('codecs', []))}: "
                     f"{milp['tokens_per_s']:.1f} (closed form)")
    if users:
        lines.append("  formats users run, on every layer (stored expert bytes: measured; content "
                     "drop: the profile's measurement of that policy, 95 % interval; tokens/s: "
                     "closed form):")
        for b in users:
            tps = "n/a" if b["tokens_per_s"] is None else f"{b['tokens_per_s']:.1f} tok/s"
            drop = iv_text(b["accuracy_drop"]) if b.get("accuracy_drop") else "n/a"
            size = "n/a" if b["host_bytes"] is None else f"{b['host_bytes']:,} B"
            lines.append(f"    {b['name'][8:]}: {size}, drop {drop}, {tps}"
                         + ("" if b.get("meets_budget") else ", over the accuracy budget"))
    best = base.get("best user format")
    if best is not None:
        lines.append(f"  {best.get('label', 'best user format')}: "
                     + (f"{best['tokens_per_s']:.1f} tok/s (closed form) against the plan's "
                        f"{_num(p.get('tokens_per_s_closed_form'))}"
                        if best["tokens_per_s"] is not None else best["note"]))
    how = (" (the profile split's measurement of this policy)" if str(
        p["accuracy_drop"].get("kind", "")).startswith("measured") else "")
    ver = plan.get("verification")
    if ver:
        lines.append(f"  verified: {ver['verified']} candidates measured on the profile split "
                     f"({sum(c['meets_budget_measured'] for c in ver['candidates'])} within the "
                     f"budget); the plan's accuracy is {ver['chosen_accuracy']} "
                     f"({ver['chosen_source']})")
    if str(p["accuracy_drop"].get("kind", "")).startswith("measured (verified"):
        how = " (measured on the profile split, whole policy)"
    kl = (val["measured"].get("text") or {}).get("kl_nats")
    if kl:
        lines.append(f"  KL(base || plan) on the text's validate half: "
                     f"{kl['value']:.3g} [{kl['low']:.3g}, {kl['high']:.3g}] nats per token "
                     f"(measured)")
    metric = plan["budget"]["metric"]
    if metric in ("kl", "ppl"):
        from planner.report_sections import iv_sig

        fmt, where = iv_sig, "the text's validate half"
    else:
        fmt, where = iv_text, f"{val['n_prompts']} held-out prompts"
    lines += [f"  {metric} drop: predicted{how} {fmt(p['accuracy_drop'])}; measured "
              f"{fmt(m['accuracy_drop'])} on {where}",
              f"  stored expert bytes: measured {m['stored_bytes']:,} ({m['ratio']:.2f}x smaller "
              f"than bf16)",
              f"verdict: {val['verdict']} — {val['verdict_detail']['reason']}"]
    if record.get("this_machine"):
        from planner.throughput import this_machine_lines

        lines += this_machine_lines(record["this_machine"])
    lines += [f"note: {n}" for n in record["notes"] + plan.get("warnings", [])]
    # where a decode speed the plan or a baseline relies on is an estimate, say so
    lines += [f"note: {n}" for n in plan.get("notes", []) if " decode: estimated" in n
              and n.split(" ", 1)[0] in {x.get("codec") for x in plan["layers"]}]
    lines.append(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return lines


def _grouped(layers: list[dict]) -> str:
    """`szp:meanabs:2 on 1,3-5; raw on 0,2,6,7`."""
    from profiles.models.expert_map import format_ranges

    by: dict[str, list[int]] = {}
    for x in layers:
        by.setdefault(x.get("spec") or x["codec"], []).append(int(x["layer"]))
    return "; ".join(f"{spec} on {format_ranges(ls)}" for spec, ls in by.items())


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"
