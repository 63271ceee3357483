"""`moesz demo`: profile, plan, simulate, validate and report on the built-in model, in one go."""

from __future__ import annotations

from typing import Optional

import typer


def demo(
    out: str = typer.Option("moesz-demo", "--out", help="Report folder to write."),
    size: str = typer.Option("default", "--size", help="default (a few minutes on 2 CPU cores) "
                             "or ci (a tiny smoke run)."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Hardware profile to use "
                                           "(default: measured on a GPU, else preset:h200-published)."),
) -> None:
    """Run the whole chain on the built-in model and write a report folder."""
    from pathlib import Path

    from planner.cli.model_eval import _progress_bar
    from planner.demo import run_demo, summary_lines

    with _progress_bar("demo") as progress:
        record = run_demo(out, progress=progress, size=size, hardware=hardware)
    for line in summary_lines(record, Path(out)):
        typer.echo(line)
