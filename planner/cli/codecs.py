"""`moesz codecs list` and `moesz codecs bench`: what codecs exist here, and how they measure."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from profiles.codecs import BOUND_MODES, get_codec, list_codecs
from profiles.codecs.bench import CSV_COLUMNS, bench, plan_runs
from profiles.codecs.bounds import check_request
from profiles.codecs.sources import DISTRIBUTIONS, load_tensors, parse_shape, random_tensor
from profiles.errors import BoundError, ConfigError
from profiles.fileio import atomic_write_text

app = typer.Typer(help="List the codecs and measure them on tensors.", no_args_is_help=True,
                  add_completion=False)
_BENCH_DTYPES = ("bf16", "fp16", "fp32")


@app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Show every codec: error-bounded or not, where it decodes, and whether it works here."""
    rows = []
    for c in list_codecs():
        ok, why = c.availability()
        rows.append({"codec": c.name, "error_bounded": c.error_bounded,
                     "decodes_on": c.decode_where(), "available": ok, "reason": why,
                     "options": {k: list(v[1]) if v[1] else "int" for k, v in c.option_spec.items()},
                     "description": c.description})
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="moesz codecs")
    for col in ("codec", "error-bounded", "decodes on", "available here", "what"):
        table.add_column(col, overflow="fold")
    for r in rows:
        avail = "yes" if r["available"] else f"no: {r['reason']}"
        table.add_row(r["codec"], "yes" if r["error_bounded"] else "no", r["decodes_on"], avail,
                      r["description"])
    Console(width=max(Console().width, 120)).print(table)


def _parse_levels(text: str) -> list[float]:
    out = []
    for part in [p for p in text.split(",") if p.strip()]:
        try:
            out.append(float(part))
        except ValueError:
            raise BoundError(f"--levels entry {part!r} is not a number; give a comma list such as "
                             f"0.1,0.5 or 1e-3,1e-2") from None
    if not out:
        raise BoundError("--levels is empty; give a comma list such as 0.1,0.5")
    return out


def _parse_options(items: list[str]) -> dict[str, dict]:
    """--option sz3.predictor=lorenzo -> {"sz3": {"predictor": "lorenzo"}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        codec, dot, name = key.partition(".")
        if not (eq and dot and codec and name):
            raise ConfigError(f"--option {item!r} is invalid; write CODEC.NAME=VALUE, e.g. "
                              f"sz3.predictor=lorenzo or szp.variant=plain")
        get_codec(codec)
        out.setdefault(codec, {})[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


@app.command("bench")
def bench_cmd(
    input: Optional[str] = typer.Option(None, "--input", help="FILE.safetensors[:NAME] or FILE.npy."),
    random: Optional[str] = typer.Option(None, "--random",
                                         help=f"Random weights (σ=0.02): {'|'.join(DISTRIBUTIONS)}."),
    shape: str = typer.Option("4096x1024", "--shape", help="Shape of --random tensors, e.g. 4096x1024."),
    dtype: str = typer.Option("bf16", "--dtype", help="dtype of --random tensors: bf16|fp16|fp32."),
    codecs: str = typer.Option("sz3,szp", "--codecs", help="Comma list of codecs (see `moesz codecs list`)."),
    mode: str = typer.Option("meanabs", "--mode", help=f"Bound mode: {'|'.join(BOUND_MODES)}."),
    levels: str = typer.Option("0.1,0.5", "--levels", help="Comma list of bound values in that mode."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per direction (median reported)."),
    option: list[str] = typer.Option([], "--option", help="Codec option CODEC.NAME=VALUE, repeatable."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="CPU threads torch may use (default: torch's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random tensors."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the rows to this CSV file."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON rows instead of the table."),
    rd: bool = typer.Option(False, "--rd", help="Rate-distortion: per tensor, ratio against RMSE "
                            "and max error of every codec and level, Pareto front marked."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --rd: also plot ratio against "
                                        "RMSE to this file (.png, .svg, .pdf)."),
):
    """Measure ratio, encode/decode GB/s, max error ÷ bound and RMSE of codecs on tensors."""
    names = [c.strip() for c in codecs.split(",") if c.strip()]
    if not names:
        raise ConfigError("--codecs is empty; give a comma list such as sz3,szp")
    for n in names:
        get_codec(n)
    level_list = _parse_levels(levels)
    for lv in level_list:
        check_request(mode, lv)
    opts = _parse_options(option)
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is invalid; valid: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    if input and random:
        raise ConfigError("give either --input or --random, not both")
    if csv_path is not None:
        from profiles.fileio import check_output_file

        check_output_file(csv_path, "--csv")
    if plot is not None:
        from profiles.codecs.rd import PLOT_SUFFIXES
        from profiles.fileio import check_output_file

        if not rd:
            raise ConfigError("--plot needs --rd (it plots the rate-distortion points)")
        check_output_file(plot, "--plot", PLOT_SUFFIXES)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads} is invalid; give 1 or more")
        torch.set_num_threads(threads)
    if input:
        tensors = load_tensors(input)
        source = input
    else:
        dist = random or "gaussian"
        if dtype not in _BENCH_DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is invalid; valid: {', '.join(_BENCH_DTYPES)}")
        shp = parse_shape(shape)
        tensors = [(f"{dist}-{shape}-{dtype}", random_tensor(dist, shp, dtype, seed=seed))]
        source = f"random {dist} σ=0.02, seed {seed}"
    total = len(tensors) * len(plan_runs(names, level_list))
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=json_out or total < 3) as prog:
        task = prog.add_task("measuring", total=total)

        def progress(done: int, tot: int, label: str) -> None:
            prog.update(task, completed=done, description=f"measuring {label}")

        rows = bench(tensors, names, mode, level_list, repeats=repeats, device=device,
                     options=opts, progress=progress)
    if csv_path is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow(r.csv_row())
        atomic_write_text(csv_path, buf.getvalue())
    if json_out:
        out = [r.to_dict() for r in rows]
        if rd:
            from profiles.codecs.rd import pareto_flags

            for d, flag in zip(out, pareto_flags(rows)):
                d["pareto"] = flag
        typer.echo(json.dumps(out, indent=2))
    elif rd:
        _print_rd(rows, source)
    else:
        _print_table(rows, source, repeats, device)
    if plot is not None:
        from profiles.codecs.rd import plot as plot_rd

        plot_rd(rows, plot, title=f"{source}: measured ratio against RMSE")
        if not json_out:
            typer.echo(f"wrote the rate-distortion plot to {plot}")
    if csv_path is not None and not json_out:
        typer.echo(f"wrote {len(rows)} rows to {csv_path}")


def _print_rd(rows, source: str) -> None:
    from profiles.codecs.rd import rd_points

    console = Console(width=max(Console().width, 120))
    for tensor, points in rd_points(rows).items():
        table = Table(title=f"{tensor} ({source}): rate-distortion, measured; ★ = on the Pareto "
                            f"front (no other point has a higher ratio at a lower RMSE)",
                      title_justify="left")
        for col, just in (("codec", "left"), ("mode", "left"), ("level", "right"),
                          ("abs bound", "right"), ("ratio vs orig", "right"), ("RMSE", "right"),
                          ("max err", "right"), ("max err/bound", "right"), ("front", "center")):
            table.add_column(col, justify=just)
        for p in points:
            r = p.row
            table.add_row(r.codec + ("*" if r.lossless_fallback else ""), r.mode or "-",
                          _fmt(r.level, "g"), _fmt(r.abs_bound, ".3g"), f"{r.ratio:.3f}",
                          f"{r.rmse:.3g}", f"{r.max_abs_err:.3g}",
                          _fmt(r.max_err_over_bound, ".3f"), "★" if p.pareto else "")
        console.print(table)
    console.print("Sorted by RMSE. rtn8/rtn4 are not error-bounded (their bound is the measured max "
                  "error); lossless/raw are exact.")


def _print_table(rows, source: str, repeats: int, device: str) -> None:
    threads = torch.get_num_threads()
    where = f"{device}, {threads} CPU thread{'s' if threads != 1 else ''}"
    table = Table(title=f"{source}: measured on this machine ({where}); GB/s of original bytes, "
                        f"median of {repeats} after 1 warm-up", title_justify="left")
    for col, just in (("tensor", "left"), ("codec", "left"), ("mode", "left"), ("level", "right"),
                      ("abs bound", "right"), ("ratio vs orig", "right"),
                      (f"enc GB/s (med {repeats})", "right"), (f"dec GB/s (med {repeats})", "right"),
                      ("max err/bound", "right"), ("RMSE", "right")):
        table.add_column(col, justify=just)
    notes = False
    for r in rows:
        codec = r.codec + ("*" if r.lossless_fallback else "")
        notes |= r.lossless_fallback
        table.add_row(r.tensor, codec, r.mode or "-", _fmt(r.level, "g"), _fmt(r.abs_bound, ".3g"),
                      f"{r.ratio:.3f}", _fmt(r.encode_gbps, ".3f"), _fmt(r.decode_gbps, ".3f"),
                      _fmt(r.max_err_over_bound, ".3f"), f"{r.rmse:.3g}")
    console = Console(width=max(Console().width, 150))
    console.print(table)
    console.print("rtn8/rtn4 (per-row absmax) and the quantized formats (gq, nf4, mxfp4, GGUF "
                  "q*_k/q8_0) are not error-bounded: their abs bound is the measured max error. "
                  "lossless/raw are exact.")
    if notes:
        console.print("* the bound could not be applied (resolved to 0 or saturation): stored "
                      "losslessly.")
