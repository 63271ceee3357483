"""`moesz report DIR`: render a results folder as markdown and a self-contained HTML page."""

from __future__ import annotations

import typer


def report(
    directory: str = typer.Argument(..., help="A results folder, e.g. the one `moesz demo` wrote."),
) -> None:
    """Write DIR/report.md (figures in DIR/report/) and DIR/report.html (figures embedded)."""
    from planner.report import render_report

    md_path, html_path = render_report(directory)
    typer.echo(f"wrote {md_path}")
    typer.echo(f"wrote {html_path} (self-contained: figures embedded)")
