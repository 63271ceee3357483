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
    text: Optional[str] = typer.Option(None, "--text", help="UTF-8 text for kl and ppl "
                                       "(default: the corpus shipped with the package)."),
    bench: Optional[list[str]] = typer.Option(None, "--bench", help="JSONL benchmark to profile "
                                              "beside the built-in tasks (repeatable)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="The plan's budget naming its "
                                         "metric, e.g. kl=0.02 (default: content=0.01)."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Refused with one line: the "
                                          "built-in model's character tokenizer cannot run "
                                          "lm-eval tasks (use them with `profile model`)."),
) -> None:
    """Run the whole chain on the built-in model and write a report folder."""
    from pathlib import Path

    from planner.cli.model_eval import _progress_bar
    from planner.demo import DemoMetrics, run_demo, summary_lines

    metrics = DemoMetrics(text=text, bench=tuple(bench or ()), budget=budget, lm_eval=lm_eval)
    with _progress_bar("demo") as progress:
        record = run_demo(out, progress=progress, size=size, hardware=hardware, metrics=metrics)
    for line in summary_lines(record, Path(out)):
        typer.echo(line)
