"""`moesz profile …`: measure this machine (`hardware`), a model (`model`), and print a profile (`show`).

Each command parses its options, calls one library function (`profiles.hardware.measure`,
`profiles.profiling.profile_model`, `profiles.profiling.read_profile`) and prints what it got; long
work reports through a progress callback shown as a rich progress bar on stderr.
"""

from __future__ import annotations

import json
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="Measure hardware and models into the profile files the simulator and "
                       "planner read.", no_args_is_help=True)
MODEL_HELP = "builtin, a local checkpoint directory (see `moesz model info`)"
_out = Console(width=120)


def _command(ctx: typer.Context) -> str:
    """The command line as parsed (canonical form: arguments, then options that were given)."""
    names, c = [], ctx
    while c.parent is not None:        # sub-command names; the root is `moesz` however invoked
        names.append(c.info_name)
        c = c.parent
    words = ["moesz"] + names[::-1]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if getattr(p, "param_type_name", "") == "argument":
            words.append(str(value))
        elif isinstance(value, (list, tuple)) and p.opts:   # a repeatable option
            for v in value:
                words += [p.opts[0], str(v)]
        elif value is not None and value != p.default and p.opts:
            words += [p.opts[0]] if p.is_flag else [p.opts[0], str(value)]
    return " ".join(shlex.quote(w) for w in words)


@contextmanager
def _progress_bar(description: str):
    """A rich progress bar on stderr, driven by `progress(done, total, label)`."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total}"), TimeElapsedColumn(), TextColumn("{task.fields[label]}"),
            console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None, label="")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, label=label[:50])

        yield progress


@app.command()
def hardware(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Where to write the hardware profile JSON."),
    model: Optional[str] = typer.Option(None, "--model", help="Also time this model's shapes: "
                                        + MODEL_HELP + ", preset:NAME or arch:NAME."),
    disk_dir: Optional[Path] = typer.Option(None, "--disk-dir", help="Directory on the drive that "
                                            "will hold offloaded experts (default: temp dir)."),
    name: Optional[str] = typer.Option(None, "--name", help="Profile name (default: host name)."),
    levels: str = typer.Option("0.1,0.3,1,2,3", "--levels", help="Codec levels (meanabs) to time."),
    quick: bool = typer.Option(False, "--quick", help="Small buffers: a smoke test, not for "
                                                      "planning."),
) -> None:
    """Measure this machine (host, GPU when present, optional model timings) into FILE.json."""
    from profiles.hardware import save_hardware
    from profiles.hardware.measure import measure_hardware
    from profiles.fileio import check_output_file
    from profiles.profiling.grid import parse_levels

    from profiles.hardware.disk import check_disk_dir

    check_output_file(out, "--out")
    check_disk_dir(disk_dir)
    with _progress_bar("profile hardware") as progress:
        prof = measure_hardware(model, name=name, disk_dir=disk_dir, levels=parse_levels(levels),
                                command=_command(ctx), quick=quick, progress=progress)
    save_hardware(prof, out)
    _print_hardware(prof)
    typer.echo(f"wrote {out}")


def _fig(f, unit: str = "", scale: float = 1.0, fmt: str = ".3g") -> str:
    return f"{f.value * scale:{fmt}}{unit} ({f.source})"


def _size(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:g} {unit}"
    return f"{n} B"


def _link(lf) -> str:
    err = "" if lf.fit_rel_error is None else f", fit error {100 * lf.fit_rel_error:.0f}%"
    return f"{lf.latency_s * 1e6:.1f} us + bytes / {lf.gbps:.3g} GB/s ({lf.source}{err})"


def _print_hardware(prof) -> None:
    h = prof.host
    t = Table(title=f"hardware profile {prof.name} ({prof.source.kind}, {prof.source.date})",
              show_header=False, title_justify="left")
    t.add_column("figure", style="bold")
    t.add_column("value")
    t.add_row("CPU", f"{h.cpu}; {_fig(h.cores, ' cores')}")
    t.add_row("host memory", _fig(h.memory_bytes, " GB", 1e-9))
    t.add_row("memory copy", _fig(h.memcpy_gbps, " GB/s"))
    t.add_row("disk read (one at a time)", _link(h.disk_read))
    if h.disk_curve is not None:
        dc = h.disk_curve
        for size, row in zip(dc.sizes, dc.gbps):
            cells = ", ".join(f"depth {d}: {v:.3g}" for d, v in zip(dc.depths, row))
            t.add_row(f"disk GB/s, {_size(size)} reads", f"{cells} ({dc.source}, {dc.method})")
        t.add_row("disk reads in flight", f"{dc.best_depth} (best depth, {dc.source})")
    for name, c in h.codecs.items():
        levels = ", ".join(f"{lv:g}: {g:.3g}" for lv, g in zip(c.decode.levels, c.decode.gbps))
        t.add_row(f"{name} decode GB/s", f"{levels} ({c.decode.source}, CPU one thread)")
        if c.threads is not None:
            sc = ", ".join(f"{n}: {x:.2f}x" for n, x in zip(c.threads.threads, c.threads.speedup))
            t.add_row(f"{name} decode threads", f"{sc} ({c.threads.source})")
        if c.encode is not None:
            levels = ", ".join(f"{lv:g}: {g:.3g}" for lv, g in zip(c.encode.levels, c.encode.gbps))
            t.add_row(f"{name} encode GB/s", f"{levels} ({c.encode.source})")
    if h.cpu_expert_ffn is not None:
        f = h.cpu_expert_ffn
        pts = ", ".join(f"{n}: {s * 1e3:.3g} ms" for n, s in zip(f.curve.tokens, f.curve.seconds))
        t.add_row("CPU expert FFN", f"{f.hidden_size}x{f.intermediate_size}: {pts} "
                                    f"({f.curve.source})")
    g = prof.gpu
    if g is None:
        t.add_row("GPU", "none visible (no gpu section)")
    elif g.serial:
        t.add_row("device", f"{g.name}, {_fig(g.memory_bytes, ' GB', 1e-9)}")
        t.add_row("expert copy (the CPU device's link)", _link(g.h2d_pinned))
    else:
        t.add_row("GPU", f"{g.name}, {_fig(g.memory_bytes, ' GB', 1e-9)}")
        for label, lf in (("H2D pinned", g.h2d_pinned), ("H2D pageable", g.h2d_pageable),
                          ("D2H pinned", g.d2h_pinned), ("D2H pageable", g.d2h_pageable)):
            t.add_row(label, _link(lf))
    if g is not None:
        if not g.serial:
            t.add_row("H2D under compute", _fig(g.h2d_under_compute_gbps, " GB/s"))
        t.add_row("bf16 GEMM", _fig(g.bf16_gemm_tflops, " TFLOP/s"))
        t.add_row("device copy", _fig(g.d2d_gbps, " GB/s"))
        for name, c in g.decode.items():
            levels = ", ".join(f"{lv:g}: {v:.3g}" for lv, v in zip(c.levels, c.gbps))
            where = "device (CPU)" if g.serial else "GPU"
            t.add_row(f"{name} {where} decode GB/s", f"{levels} ({c.source})")
    for mt in prof.model_timings:
        e = mt.expert_ffn
        pts = ", ".join(f"{n}: {s * 1e3:.3g} ms" for n, s in zip(e.tokens, e.seconds))
        t.add_row(f"{mt.model} expert FFN", f"{pts} ({e.source})")
        a = mt.attention_router
        t.add_row(f"{mt.model} attention+router",
                  f"batch {a.batch[0]}, context {a.context_tokens[0]}: {a.seconds[0][0] * 1e3:.3g} ms"
                  f"; batch {a.batch[-1]}, context {a.context_tokens[-1]}: "
                  f"{a.seconds[-1][-1] * 1e3:.3g} ms ({a.source})")
    _out.print(t)


@app.command("model")
def model_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", help="Profile directory (created; rerun to resume)."),
    codecs: str = typer.Option("szp,sz3", "--codecs", help="Codecs to profile (lossless, rtn8 "
                               "and rtn4 baselines are always added)."),
    per_matrix: bool = typer.Option(False, "--per-matrix", help="Also perturb only gate_up and "
                                    "only down (or the kinds --matrices names) of each profiled "
                                    "layer and group at each level, and measure ratios per matrix "
                                    "kind (for `plan --per-matrix`)."),
    matrices: Optional[str] = typer.Option(None, "--matrices", help="The matrix kinds "
                                           "--per-matrix perturbs one at a time (implies "
                                           "--per-matrix): gate_up, down, gate, up; gate and up "
                                           "are split out of a fused gate_up_proj. Default "
                                           "gate_up,down (gate,up,down where a model keeps "
                                           "them apart in memory)."),
    baselines: str = typer.Option("", "--baselines", help="Formats users run (nf4, mxfp4, "
                                  "q4_k, q3_k, gq) measured on the whole model only, as baselines "
                                  "to compare plans with (--codecs makes them planner choices)."),
    mode: str = typer.Option("meanabs", "--mode", help="Bound mode: abs, rel, meanabs, std."),
    levels: str = typer.Option("0.1,0.3,1,2,3", "--levels", help="Bound levels."),
    layers: str = typer.Option("all", "--layers", help="MoE layers: all or 0,3,7 or 0-3."),
    groups: str = typer.Option("thirds", "--groups", help="Layer groups: thirds, none, or "
                               "G1=0-3,G2=4-7 (thirds;G1=0-3 for both)."),
    target: str = typer.Option("all", "--target", help="Experts of each target: all, top:N "
                               "(most activated, from traces) or expert:E."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Prompts per task (default: "
                                        "enough for a one-point budget; see docs/profiling.md)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma list of built-in tasks "
                                        "(default: all)."),
    split: str = typer.Option("profile", "--split", help="Evaluation split."),
    design: str = typer.Option("grid", "--design", help="grid, or paper (the study's design)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL shared by "
                                          "workers (default: sqlite in --out); journal:FILE "
                                          "for a journal file."),
    max_evals: Optional[int] = typer.Option(None, "--max-evals", help="Run at most N sweep points "
                                            "now (rerun to continue)."),
    ratio_sample: Optional[int] = typer.Option(None, "--ratio-sample", help="Experts per layer "
                                               "for ratios (default: all, at most 16)."),
    seed: int = typer.Option(0, "--seed", help="Seed of prompts, samples and noise."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Exit when nothing is left to claim "
                                 "instead of waiting for other workers' points."),
    threads: int = typer.Option(1, "--threads", help="Torch threads for evaluation (run one "
                                "worker per core instead of more threads)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    host_mem: Optional[str] = typer.Option(
        None, "--host-mem", help="Leave the routed experts on disk, holding at most this much of "
        "them in host memory (e.g. 8GiB, 25%): for models larger than RAM."),
    ratios_only: bool = typer.Option(
        False, "--ratios-only", help="Only measure compression ratios, streamed expert by expert "
        "from the checkpoint's files (no model is loaded); a full run reuses them."),
    bench: Optional[list[Path]] = typer.Option(None, "--bench", help="JSONL benchmark with "
                                               "question/answer lines (repeatable); its profile "
                                               "half (by a hash of the question) is measured."),
    template: Optional[str] = typer.Option(None, "--template", help="Prompt template for --bench, "
                                           "with {question}."),
    extract: Optional[str] = typer.Option(None, "--extract", help="Answer-extraction regex for "
                                          "--bench strict accuracy."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Generation budget for "
                                       "--bench items."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text corpus: KL to the "
                                        "unperturbed model, top-1 agreement and perplexity ratio "
                                        "on its profile half (default: the built-in tasks' "
                                        "prompts and answers)."),
    text_tokens: Optional[int] = typer.Option(None, "--text-tokens", help="Predicted tokens of "
                                              "the text's profile half, at most (default: as "
                                              "many as a 2 GiB reference holds, up to 262,144)."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks "
                                          "TASK[,TASK]: task YAML files, or registered names "
                                          "whose data are in the local Hugging Face cache "
                                          "(needs moesz[lmeval]); the profile half of their "
                                          "documents (by a hash of each) is measured."),
) -> None:
    """Profile a model: compression ratios, accuracy sensitivity, routing traces -> DIR."""
    from planner.cli.model_eval import host_bytes
    from profiles.profiling import ProfileRequest, profile_model

    request = ProfileRequest(
        model=model, out=out, codecs=codecs, baselines=baselines, mode=mode, levels=levels,
        layers=layers,
        groups=groups, target=target, limit=limit, tasks=tasks, split=split, design=design,
        storage=storage, max_evals=max_evals, ratio_sample=ratio_sample, seed=seed,
        wait_for_others=not no_wait, threads=threads, command=_command(ctx),
        host_mem=host_bytes(model, host_mem) if host_mem else None,
        bench=tuple(str(b) for b in bench or ()), template=template, extract=extract,
        max_new_tokens=max_new_tokens, text=None if text is None else str(text),
        text_tokens=text_tokens, lm_eval=lm_eval, per_matrix=per_matrix, matrices=matrices)
    if ratios_only:
        _ratios_only(request, as_json)
        return
    with _progress_bar("profile model") as progress:
        result = profile_model(request, progress=progress)
    if as_json:
        typer.echo(json.dumps(result.summary(), indent=2))
        return
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    _out.print(f"{result.points_done}/{result.points_total} sweep points done; this run: "
               f"{len(result.ran)} points ({result.evaluated} evaluated, "
               f"{len(result.ran) - result.evaluated} with weights seen before) in "
               f"{result.seconds:.0f} s, {result.evals_per_s:.3g} evaluations/s (measured); "
               + ("complete" if result.complete else "incomplete: rerun the same command to resume"))
    _print_model_profile(result.profile)
    typer.echo(f"wrote {out}")


def _ratios_only(request, as_json: bool) -> None:
    from profiles.packed.write import peak_rss_bytes
    from profiles.profiling.profiler import profile_ratios
    from profiles.serving import format_bytes

    with _progress_bar("ratios") as progress:
        frame, seconds = profile_ratios(request, progress=progress)
    peak = peak_rss_bytes()
    if as_json:
        typer.echo(json.dumps({"out": str(request.out), "seconds": seconds,
                               "peak_rss_bytes": peak,
                               "ratios": json.loads(frame.to_json(orient="records"))}, indent=2))
        return
    table = Table("layer", "codec", "level", "matrix", "ratio vs original dtype (measured)",
                  "experts", "max err/bound", title="compression ratios, measured on the checkpoint's "
                  "experts (every stored byte counted)", title_justify="left")
    for r in frame.itertuples():
        level = "-" if r.level != r.level else f"{r.level:g}"
        err = "-" if r.max_err_over_bound != r.max_err_over_bound else f"{r.max_err_over_bound:.3f}"
        table.add_row(str(r.layer), r.codec, level, getattr(r, "matrix", "all"),
                      f"{r.ratio:.3f} [{r.ratio_min:.3f}, {r.ratio_max:.3f}]",
                      f"{r.n_experts}/{r.n_experts_total}", err)
    _out.print(table)
    _out.print(f"{seconds:.1f} s, peak memory {format_bytes(peak)} resident (measured); rerun "
               f"without --ratios-only to profile sensitivity (these ratios are reused)")
    typer.echo(f"wrote {request.out}")


@app.command()
def show(
    path: Path = typer.Argument(..., help="A model profile directory (or its profile.json) or "
                                          "a hardware profile JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print a model or hardware profile."""
    from profiles.hardware import load_hardware
    from profiles.profiling import read_profile

    kind = _kind_of(path)
    if kind == "hardware_profile" or (path.is_file() and path.name != "profile.json"
                                      and kind != "model_profile"):
        prof = load_hardware(path)
        if as_json:
            typer.echo(json.dumps(prof.to_dict(), indent=2))
        else:
            _print_hardware(prof)
        return
    prof = read_profile(path)
    if as_json:
        typer.echo(json.dumps(prof.to_json(), indent=2))
        return
    _print_model_profile(prof)


def _kind_of(path: Path) -> str:
    if path.is_file():
        try:
            return json.loads(path.read_text()).get("kind", "")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return ""
    return "model_profile"


def _print_model_profile(prof) -> None:
    from profiles.profiling.summary import paper_table, ratio_table, sensitivity_table

    d = prof.doc
    g = d["model"]["geometry"]
    lim = d["detection_limit"]
    _out.print(f"[bold]model profile[/bold] {prof.path}: {d['model']['spec']} (fingerprint "
               f"{d['model'].get('fingerprint')}), {len(g['moe_layers'])} MoE layers x "
               f"{g['experts_per_layer']} experts; split {d['split']}, {d['prompts_per_task']} "
               f"prompts x {len(d['tasks'])} tasks; design {d['design']}; "
               f"{d['points_done']}/{d['points_total']} points"
               + ("" if d["complete"] else " (incomplete)"))
    base = ", ".join(f"{t} {100 * b['content']['value']:.1f}%" for t, b in d["baseline"].items())
    from profiles.profiling.metrics import profile_metrics

    if base:
        _out.print(f"baseline content accuracy (measured): {base}")
    metrics = profile_metrics(d)
    _out.print(f"metrics a budget may name: {', '.join(metrics['available'])} (kl: "
               f"{metrics['kl']['unit']} on {metrics['kl']['corpus']})", highlight=False)
    for t in metrics.get("lm_eval") or ():
        _out.print(f"{t['name']}: lm-eval {t['output_type']} task from {t['source']}, "
                   f"{t['num_fewshot']}-shot, scored per document by its {t['metric']!r} "
                   f"(strict and content are both that); {t['docs']} documents, split by a hash "
                   f"of each", highlight=False)
    how = (f"median paired 95% half-width over {lim['points_measured']} points"
           if lim.get("points_measured") else "no point yet: the floor with no discordant prompt")
    if lim.get("metric"):
        _out.print(f"detection limit ({lim['metric']} accuracy, mean over tasks): "
                   f"±{100 * lim['half_width']:.2f} points ({how}; measured)")
    for title, header, rows in (ratio_table(prof), sensitivity_table(prof), paper_table(prof)):
        if not rows:
            continue
        t = Table(title=title, title_justify="left")
        for name in header:
            t.add_column(name, no_wrap=True)
        for r in rows:
            t.add_row(*r)
        _out.print(t)
