"""`moesz policy show`: the storage spec of each matrix at each level of a policy."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Inspect storage policies (policy files, or plans holding one).",
                  no_args_is_help=True)


@app.command("show")
def show(file: str = typer.Argument(..., help="A policy file, a plan file or a packed "
                                               "checkpoint's manifest.json.")) -> None:
    """Print a policy's per-matrix table: default, each layer and each expert it names."""
    from profiles.policy import Policy

    print_policy(Policy.load(file))


def print_policy(policy, console: Console | None = None) -> None:
    """Render `Policy.matrix_table()` as a table."""
    console = console or Console(width=140)
    columns, rows = policy.matrix_table()
    kind = "per-matrix" if policy.per_matrix else "per-expert"
    t = Table(title=f"storage per matrix ({kind} policy, schema version {policy.schema_version}, "
                    f"fingerprint {policy.fingerprint or 'any model'})", title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    console.print(t)
