"""The capcli command line: each command is a thin layer over one pipeline module."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from typer.core import TyperGroup

from capcli import __version__
from capcli.console import err, out
from capcli.errors import CapcliError


class _Group(TyperGroup):
    """Turns user errors into one line on stderr and exit 1, and Ctrl-C into exit 130."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CapcliError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted; finished work is kept, run the same command again to resume")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="Train CNN+LSTM image-captioning models, export them to ONNX, caption with ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"capcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Train CNN+LSTM image-captioning models, export them to ONNX, caption with ONNX Runtime."""


@app.command()
def backbones(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the installed backbone plugins."""
    from capcli.registry import plugins

    found = plugins()
    rows = []
    for p in found:
        b = p.backbone
        rows.append(
            {
                "name": p.name,
                "feature_dim": b.feature_dim if b else None,
                "input_size": b.input_size if b else None,
                "weights": b.weights_source if b else None,
                "distribution": p.distribution,
                "version": p.version,
                **({"error": p.error} if p.error else {}),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.table import Table

    table = Table(title="capcli backbones")
    for col in ("name", "feature dim", "input", "weights", "distribution", "version"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], "[red]failed to load[/red]", "", r["error"], r["distribution"], r["version"])
        else:
            table.add_row(
                r["name"], str(r["feature_dim"]), str(r["input_size"]), r["weights"],
                r["distribution"], r["version"],
            )
    if not rows:
        err.print("no backbone plugins installed (or CAPCLI_PLUGINS excludes them all)")
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
