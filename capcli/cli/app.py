"""The Typer app: error handling shared by every command, and the registration of each stage's commands."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperGroup

from capcli import __version__
from capcli.cli import caption, data, demo, doctor, evaluate, export, inspect, serve, train
from capcli.console import err, out
from capcli.errors import CapcliError

# What only `pip install capcli[train]` brings: train, features, export, demo and --runtime torch need it.
TRAINING_STACK = {"torch", "torchvision", "onnx", "onnxscript", "matplotlib", "kagglehub", "timm"}
NEEDS_TRAINING_STACK = "this command needs the training stack ({module} is not installed): pip install 'capcli[train]'"


class ErrorHandlingGroup(TyperGroup):
    """Turns user errors into one line on stderr and exit 1, and Ctrl-C into exit 130."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CapcliError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True)
            raise typer.Exit(1) from None
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in TRAINING_STACK:
                raise
            err.print(f"[red]error:[/red] {escape(NEEDS_TRAINING_STACK.format(module=exc.name))}", markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted; finished work is kept: rerun the same command to resume "
                      "(for train, add --resume)")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=ErrorHandlingGroup,
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


# In pipeline order, as `capcli --help` lists them.
app.command()(inspect.backbones)
app.command()(train.features)
app.command()(train.train)
app.command("export")(export.export_cmd)
app.command()(caption.caption)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command()(demo.demo)
app.command()(serve.serve)
app.add_typer(data.app, name="data")
app.command()(doctor.doctor)
app.command("env", hidden=True)(doctor.doctor)


def main() -> None:
    app()
