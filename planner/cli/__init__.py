"""The `moesz` command line: a thin layer that parses options and calls one library function each.

Sub-commands live in sibling modules (`codecs.py`, `model.py`, ...), each defining a `typer.Typer`
named `app` that is registered here. Errors a user can cause (`profiles.errors.MoeszError`) are
printed as one line on stderr with exit code 1 and no traceback.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from profiles.errors import MoeszError


class _MoeszGroup(TyperGroup):
    """Top-level group that turns library errors into one clean line and a non-zero exit."""

    # typer 0.29 vendors its own click, so its `Exit` (not click's) is the one it handles cleanly
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoeszError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; results written so far are kept", err=True)
            raise typer.Exit(130) from None


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
    from planner.cli import model_eval  # noqa: F401  (adds `model eval` and `model trace`)
    from planner.cli import simulate

    app.command("simulate")(simulate.simulate)
    from planner.cli import profile

    app.add_typer(profile.app, name="profile")
    from planner.cli import pack, run

    app.command("pack")(pack.pack)
    app.command("run")(run.run)
    from planner.cli import demo, report, validate

    app.command("demo")(demo.demo)
    app.command("validate")(validate.validate)
    app.command("report")(report.report)
    from planner.cli import plan as plan_cli
    from planner.cli import policy as policy_cli

    app.add_typer(policy_cli.app, name="policy")

    app.add_typer(plan_cli.app, name="plan")


_register()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
