"""The `moesz` command line: a thin layer that parses options and calls one library function each.

Sub-commands live in sibling modules (`codecs.py`, `model.py`, ...), each defining a `typer.Typer`
named `app` that is registered here. Errors a user can cause (`profiles.errors.MoeszError`) are
printed as one line on stderr with exit code 1 and no traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperGroup

from profiles.errors import MoeszError


class _MoeszGroup(TyperGroup):
    """Top-level group that turns library errors into one clean line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoeszError as exc:
            click.echo(f"error: {exc}", err=True)
            raise click.exceptions.Exit(1) from None
        except KeyboardInterrupt:
            click.echo("interrupted; results written so far are kept", err=True)
            raise click.exceptions.Exit(130) from None


app = typer.Typer(
    cls=_MoeszGroup,
    name="moesz",
    help="Plan per-layer error bounds for compressed, offloaded MoE experts: profile, simulate, "
    "plan, validate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from planner.cli import codecs

    app.add_typer(codecs.app, name="codecs")
    from planner.cli import model

    app.add_typer(model.app, name="model")
    from planner.cli import simulate

    app.command("simulate")(simulate.simulate)


_register()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
