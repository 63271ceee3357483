"""`moesz plan`: choose per-layer codecs and levels that maximize predicted throughput under an
accuracy budget; `moesz plan show FILE` prints a plan."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from profiles.errors import ConfigError

app = typer.Typer(help="Plan per-layer error bounds under an accuracy budget; `plan show FILE` "
                       "prints a plan.", add_completion=False)


@app.callback(invoke_without_command=True)
def plan(
    ctx: typer.Context,
    profile: Optional[str] = typer.Option(None, "--profile", help="Model profile directory."),
    hardware: str = typer.Option("preset:h200-published", "--hardware",
                                 help="Hardware profile: FILE or preset:NAME."),
    accuracy_budget: Optional[str] = typer.Option(
        None, "--accuracy-budget", help="Largest allowed drop of the metric averaged over tasks "
        "(0.01 = one point; nats for --metric kl)."),
    budget: Optional[list[str]] = typer.Option(
        None, "--budget", help="The budget naming its metric: kl=0.02 (nats per token), "
        "ppl=1.01 (perplexity ratio), content=0.01, strict=0.01, or TASK=0.02 (one benchmark's "
        "content accuracy); the profile must have the metric. Repeatable: the plan meets every "
        "one (the search runs on the first) and says which binds."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="GPU budget: 24GiB or 25%."),
    host_mem: str = typer.Option("unlimited", "--host-mem",
                                 help="Host budget for stored experts: 512GiB or 25%."),
    cache: str = typer.Option("lru", "--cache", help="lru, lfu or static-hot."),
    prefetch: str = typer.Option("none", "--prefetch", help="none, next:ACC or oracle."),
    on_miss: str = typer.Option("fetch", "--on-miss", help="fetch (to the GPU) or cpu."),
    resident: str = typer.Option("decompressed", "--resident",
                                 help="Cached experts kept decompressed or compressed."),
    gpu_decode: str = typer.Option("stream", "--gpu-decode", help="stream or compute."),
    layer_slots: Optional[str] = typer.Option(None, "--layer-slots",
                                              help="Per-layer cache: N or N,N,… per MoE layer."),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
    prompt: int = typer.Option(128, "--prompt", help="Prompt tokens per sequence."),
    tokens: int = typer.Option(256, "--tokens", help="Generated tokens per sequence."),
    pageable: bool = typer.Option(False, "--pageable", help="Host buffers pageable, not pinned."),
    placement_traces: Optional[str] = typer.Option(
        None, "--placement-traces", help="Rank static placements by these traces instead of the "
        "profile's own (which the plan is predicted on)."),
    metric: str = typer.Option("content", "--metric", help="Metric of --accuracy-budget: content, "
                               "strict, kl, ppl or a task's name (or use --budget METRIC=X)."),
    codecs: Optional[str] = typer.Option(None, "--codecs",
                                         help="Codecs to consider, e.g. szp,sz3 (default: those "
                                              "that cut transfer here)."),
    trials: int = typer.Option(300, "--trials", help="Optuna trials from a cold start."),
    warm_trials: int = typer.Option(20, "--warm-trials",
                                    help="Trials after enqueuing the MILP optimum."),
    storage: Optional[str] = typer.Option(None, "--storage",
                                          help="Optuna storage URL (sqlite:///plan.db, …) to "
                                               "resume or share the study."),
    seed: int = typer.Option(0, "--seed", help="Sampler seed."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe, or nsga2 (Pareto front of "
                                                         "throughput, accuracy, host memory)."),
    space: str = typer.Option("auto", "--space", help="auto (per-layer for small models, else "
                              "lagrangian), lagrangian or per-layer."),
    confidence: float = typer.Option(0.95, "--confidence",
                                     help="One-sided confidence of the accuracy bound."),
    rerank: int = typer.Option(3, "--rerank", help="Candidates re-ranked by the simulator."),
    verify: Optional[int] = typer.Option(
        None, "--verify", help="Measure N candidates for real on the profile split (loads the "
        "model; rows kept in the profile, reused on rerun) and plan the fastest whose measured "
        "bound meets the budget; default 3 on a measured profile, 0 on a synthetic one."),
    simulate_baselines: bool = typer.Option(False, "--simulate-baselines",
                                            help="Also simulate every baseline."),
    per_matrix: bool = typer.Option(False, "--per-matrix", help="A level per (layer, matrix): "
                                    "gate_up and down each get their own spec (needs a profile "
                                    "made with `profile model --per-matrix`)."),
    cache_allocation: bool = typer.Option(False, "--cache-allocation",
                                          help="Also search the per-layer cache allocation."),
    plots: Optional[str] = typer.Option(None, "--plots",
                                        help="Plot folder (default: next to --out)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Write no plots."),
    out: Optional[str] = typer.Option(None, "--out", help="Plan file to write (plan.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan per-layer codecs and levels that maximize predicted decode tokens/s under an
    accuracy budget."""
    if ctx.invoked_subcommand is not None:
        return
    from scipy.stats import norm

    from planner.pipeline import PlanRequest, make_plan, write_plots
    from profiles.serving import ServingConfig, parse_mem

    from planner.budget import parse_budget

    budgets = [parse_budget(b) for b in budget or ()]
    if budgets and accuracy_budget is not None:   # the accuracy budget is then one more
        budgets.append((metric, accuracy_budget))
    if budgets:
        metric, accuracy_budget = budgets[0]
    if len({m for m, _ in budgets}) < len(budgets):
        raise ConfigError(f"two budgets on the same metric ({', '.join(m for m, _ in budgets)}); "
                          f"give each metric once")
    for name, value in (("--profile", profile), ("--accuracy-budget or --budget", accuracy_budget),
                        ("--gpu-mem", gpu_mem), ("--out", out)):
        if value is None:
            raise ConfigError(f"{name} is required: moesz plan --profile DIR --hardware "
                              f"preset:NAME --accuracy-budget 0.01 --gpu-mem 25% --out plan.json")
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence {confidence} must be in [0.5, 1), e.g. 0.95")
    from profiles.fileio import check_output_dir, check_output_file

    check_output_file(out, "--out")
    if not no_plots:
        check_output_dir(plots or Path(out).with_name(Path(out).stem + "-plots"), "--plots")
    gb = parse_mem(gpu_mem, what="--gpu-mem")
    hb = parse_mem(host_mem, what="--host-mem")
    slots = None
    if layer_slots:
        try:
            slots = tuple(int(v) for v in layer_slots.split(","))
        except ValueError:
            raise ConfigError(f"--layer-slots {layer_slots!r}: expected N or N,N,…") from None
    serving = ServingConfig(cache_policy=cache, resident_form=resident, prefetch=prefetch,
                            on_miss=on_miss, batch_size=batch, prompt_tokens=prompt,
                            generated_tokens=tokens, pinned=not pageable,
                            gpu_decode=gpu_decode).with_budgets(gb, hb)
    if slots is not None:
        serving = _with_slots(serving, slots, profile)
    req = PlanRequest(profile=profile, hardware=hardware, budget=accuracy_budget,
                      serving=serving, metric=metric,
                      codecs=tuple(c.strip() for c in codecs.split(",")) if codecs else None,
                      trials=trials, warm_trials=warm_trials, storage=storage, seed=seed,
                      sampler=sampler, space=space, z=float(norm.ppf(confidence)), rerank=rerank,
                      simulate_baselines=simulate_baselines, cache_allocation=cache_allocation,
                      placement_traces=placement_traces, verify=verify,
                      more_budgets=tuple(budgets[1:]), per_matrix=per_matrix,
                      command="moesz plan " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    with Progress(transient=True, disable=as_json) as bar:
        task = bar.add_task("planning", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        outcome = make_plan(req, out=out, progress=progress)
        written = []
        if not no_plots:
            bar.update(task, description="plots", total=None)
            folder = Path(plots) if plots else Path(out).with_name(Path(out).stem + "-plots")
            written = write_plots(outcome, folder)
    if as_json:
        typer.echo(json.dumps(outcome.plan.doc, indent=2))
        return
    print_plan(outcome.plan.doc)
    console = Console(width=140)
    console.print(f"wrote {out}" + "".join(f"\nwrote {p}" for p in written))


def _with_slots(serving, slots, profile):
    from planner.modelprofile import load_profile
    from profiles.serving import ServingConfig

    n = len(load_profile(profile).geometry.moe_layers)
    vals = list(slots) * n if len(slots) == 1 else list(slots)
    return ServingConfig.from_dict({**serving.to_dict(), "per_layer_cache_slots": vals})


@app.command("show")
def show(
    file: str = typer.Argument(..., help="A plan file (plan.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan file's JSON."),
) -> None:
    """Print a plan: layers, predictions, baselines and the search."""
    from planner.plan import load_plan

    plan = load_plan(file)
    if as_json:
        typer.echo(json.dumps(plan.doc, indent=2))
        return
    print_plan(plan.doc)


def _fmt_drop(d: dict | None) -> tuple[str, str]:
    if not d:
        return "n/a", "n/a"
    if d.get("metric") in ("kl", "ppl"):   # values span orders of magnitude
        return f"{d['value']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]", f"{d['ucb']:.3g}"
    return f"{d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]", f"{d['ucb']:.4f}"


def _num(v, fmt="{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def print_plan(doc: dict) -> None:
    """Render a plan document as tables."""
    console = Console(width=140)
    m, b, p = doc["model"], doc["budget"], doc["predicted"]
    sv = doc["serving"]
    console.print(f"[bold]plan[/bold] for {m['geometry_name']} (fingerprint {m['fingerprint']}; "
                  f"{m['profile_source']} profile {m['profile']})")
    console.print(f"hardware {doc['hardware']['source']} (sha256 "
                  f"{(doc['hardware']['sha256'] or 'n/a')[:12]}…); GPU budget "
                  f"{_budget(sv, 'gpu_mem')}, host budget {_budget(sv, 'host_mem')}, cache "
                  f"{sv['cache_policy']}, prefetch {sv['prefetch']}, batch {sv['batch_size']}, "
                  f"{sv['generated_tokens']} tokens")
    over = (f", averaged over {len(b['averaged_over_tasks'])} task(s)"
            if b.get("averaged_over_tasks") else "")
    given = (f" (given as ppl={b['given']:g})" if b["metric"] == "ppl" and "given" in b else "")
    console.print(f"budget: {b['metric']} drop <= {b['value']:g} ({b['unit']}){given}, "
                  f"{b['bound']} z={b['z']:.3f}{over}", highlight=False)
    t = Table(title="predicted (closed form, and the discrete-event simulation)",
              title_justify="left")
    for col in ("policy", "tok/s closed form", "tok/s sim", "drop [95% CI]", "upper bound",
                "meets budget", "host memory"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    def star(drop) -> str:  # a drop the profile measured on exactly that (uniform) policy
        return " *" if drop and str(drop.get("kind", "")).startswith("measured") else ""

    t.add_row(f"[bold]plan[/bold] ({p.get('source', 'search')}){star(p['accuracy_drop'])}",
              _num(p["tokens_per_s_closed_form"]),
              _num(p["tokens_per_s_simulation"]), *_fmt_drop(p["accuracy_drop"]), "yes",
              _gib(p["host_bytes"]))
    for x in doc["baselines"]:
        t.add_row(x.get("label", x["name"]) + star(x["accuracy_drop"]), _num(x["tokens_per_s"]),
                  _num(x.get("tokens_per_s_simulation")), *_fmt_drop(x["accuracy_drop"]),
                  "yes" if x["meets_budget"] else "no", _gib(x["host_bytes"]))
    console.print(t)
    if any(star(x["accuracy_drop"]) for x in [p] + doc["baselines"]):
        console.print("* drop measured by the profile on exactly that policy (whole model), used "
                      "as its prediction; other drops: the additive accuracy model")
    mi, se = doc["milp"], doc["search"]
    cs = se["cold_start"]
    gap = "n/a" if cs["gap_to_milp"] is None else f"{cs['gap_to_milp'] * 100:.2f} %"
    console.print(f"MILP optimum (HiGHS, exact for the additive model"
                  f"{'' if mi['exact_for_closed_form'] else ', linearized closed form'}): "
                  f"{mi['tokens_per_s']:.3f} tok/s predicted, certified {mi['certified']}, "
                  f"{mi['solves']} MILPs in {mi['wall_s']:.1f} s")
    console.print(f"Optuna {se['sampler']} ({se['space']} space, seed {se['seed']}): cold start "
                  f"{cs['trials']} trials -> {_num(cs['best_tokens_per_s'], '{:.3f}')} tok/s, gap "
                  f"to MILP {gap}, within 1 % after {cs['trials_to_within_1pct'] or 'never'} "
                  f"trials; warm start (MILP enqueued) -> "
                  f"{se['warm_start']['best_tokens_per_s']:.3f} tok/s; {se['trials_total']} "
                  f"trials in study {se['study_name']}")
    lt = Table(title="layers", title_justify="left")
    for col in ("layer", "choice", "ratio", "drop (single layer, ±95%)", "layer time/step"):
        lt.add_column(col, justify="right" if col != "choice" else "left")
    for x in doc["layers"]:
        drop = "whole-model row" if x["drop"] is None else \
            f"{x['drop']:+.4f} ± {1.96 * x['drop_sd']:.4f}"
        lt.add_row(str(x["layer"]), x["spec"], f"{x['ratio']:.2f}", drop,
                   "n/a" if x["layer_s_per_step"] is None else
                   f"{x['layer_s_per_step'] * 1e3:.3f} ms")
    console.print(lt)
    if doc.get("policy", {}) and (_per_matrix(doc["policy"]) or doc.get("matrices")):
        from planner.cli.policy import print_policy
        from planner.protection import matrix_summary
        from profiles.policy import Policy

        policy = Policy.from_dict(doc["policy"], "plan policy")
        if policy.per_matrix:
            print_policy(policy, console)
        # derived from the plan's policy (plans made before the summary have none written)
        console.print(matrix_summary(policy, [x["layer"] for x in doc["layers"]]),
                      highlight=False)
    if doc.get("budgets"):
        parts = []
        for r in doc["budgets"]:
            bound = "n/a" if r["ucb"] is None else f"{r['ucb']:.4g}"
            kind = str((r.get("drop") or {}).get("kind", "")).split(" (")[0] or "unknown"
            parts.append(f"{r['metric']} <= {r['value']:g}: upper bound {bound} ({kind})"
                         + (", binding" if r["metric"] == doc.get("binding_budget") else ""))
        console.print("budgets the plan meets: " + "; ".join(parts), highlight=False)
    via = p.get("content_drop_via_kl")
    if via:
        c = doc["kl_calibration"]
        console.print(f"content drop the plan's KL implies: {100 * via['value']:+.2f} "
                      f"[{100 * via['low']:+.2f}, {100 * via['high']:+.2f}] points (predicted: "
                      f"calibration content drop = {c['beta']:.3g} x KL, beta ± "
                      f"{1.96 * c['beta_se']:.2g}, fitted on {c['points']} profile points, "
                      f"reduced chi-square {c['chi2_reduced']:.2f})", highlight=False)
    ver = doc.get("verification")
    if ver:
        vt = Table(title=f"verified candidates (measured on the profile split, {ver['wall_s']:.0f} "
                         f"s; the plan's accuracy is {ver['chosen_accuracy']})",
                   title_justify="left")
        for col in ("rank", "candidate", "tok/s sim", "predicted drop", "measured drop [95%]",
                    "measured bound", "meets budget"):
            vt.add_column(col, justify="left" if col == "candidate" else "right")
        for c in ver["candidates"]:
            pd_, _ = _fmt_drop(c["predicted_drop"])
            md, ub = _fmt_drop(c["measured_drop"])
            vt.add_row(str(c["rank"]), c["source"], _num(c["tokens_per_s_simulation"]), pd_, md,
                       ub, "yes" if c["meets_budget_measured"] else "no")
        console.print(vt)
    for w in doc.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    for n in doc.get("notes", []):
        console.print(f"note: {n}")
    console.print("All tokens/s are predicted, and drops are predictions for held-out prompts; "
                  "ratios come from the profile "
                  f"({m['profile_source']}).")


def _per_matrix(policy_doc: dict) -> bool:
    levels = [policy_doc.get("default") or {}, *(policy_doc.get("layers") or {}).values(),
              *(policy_doc.get("experts") or {}).values()]
    return any("matrices" in v for v in levels if isinstance(v, dict))


def _budget(sv: dict, name: str) -> str:
    from profiles.serving import format_bytes

    if sv.get(f"{name}_bytes") is not None:
        return format_bytes(sv[f"{name}_bytes"])
    if sv.get(f"{name}_fraction") is not None:
        return f"{sv[f'{name}_fraction'] * 100:g}% of expert bytes"
    return "unlimited"


def _gib(n) -> str:
    from profiles.serving import format_bytes

    return "n/a" if n is None else format_bytes(n)


@app.command("synthetic-profile")
def synthetic_profile(
    model: str = typer.Argument(..., help="A geometry: preset:NAME, arch:NAME[,k=v…], builtin "
                                          "or a checkpoint directory (weights are not read)."),
    out: str = typer.Option(..., "--out", help="Profile directory to write."),
    levels: str = typer.Option("0.05,0.1,0.2,0.3,0.5,0.8,1,1.5", "--levels",
                               help="meanabs levels."),
    codecs: str = typer.Option("szp", "--codecs", help="Codecs to measure: error-bounded ones "
                               "at every level, formats without a bound (nf4, q4_k, …) once."),
    seed: int = typer.Option(0, "--seed", help="Seeds weights, sensitivities and traces."),
) -> None:
    """Write a SYNTHETIC model profile for a geometry (ratios measured with the real codecs on
    Gaussian weights of its shapes, sensitivities from a seeded generator) to plan what-ifs."""
    from planner.synthetic import write_synthetic_profile

    try:
        lv = tuple(float(x) for x in levels.split(","))
    except ValueError:
        raise ConfigError(f"--levels {levels!r}: expected numbers such as 0.1,0.3,1") from None
    with Progress(transient=True) as bar:
        task = bar.add_task("measuring ratios", total=None)
        path = write_synthetic_profile(
            model, out, codecs=tuple(c.strip() for c in codecs.split(",")), levels=lv, seed=seed,
            command="moesz plan " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
            progress=lambda d, t, label: bar.update(task, completed=d, total=t,
                                                    description=label))
    Console().print(f"wrote synthetic profile {path} (labelled synthetic: not measured on a model)")
