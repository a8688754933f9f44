"""The Typer app: error handling shared by every command, and the registration of each stage's commands."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from importlib.util import find_spec
from typing import Annotated

import typer
from typer.core import TyperGroup

from capcli import __version__
from capcli.cli import caption, data, demo, doctor, evaluate, export, inspect, serve, train
from capcli.console import err, error, out, tolerant_streams
from capcli.errors import CapcliError
from capcli.paths import describe_os_error

try:  # recent Typer carries its own copy of click, whose exceptions are not click's
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older Typer on the real click
    from click.exceptions import NoArgsIsHelpError, UsageError

# What only `pip install capcli[train]` brings: the training commands and --runtime torch need it.
TRAINING_STACK = {"torch", "torchvision", "onnx", "onnxscript", "matplotlib", "kagglehub", "timm"}
TRAINING_COMMANDS = {"features", "train", "scst", "export", "demo"}
NEEDS_TRAINING_STACK = "this command needs the training stack ({module} is not installed): pip install 'capcli[train]'"


class ErrorHandlingGroup(TyperGroup):
    """Every way a command can fail ends in one line on stderr: user errors and operating-system errors
    exit 1, usage errors (a bad option value) exit 2, Ctrl-C exits 130. Never a traceback."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        with _one_line_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def resolve_command(self, ctx, args):  # type: ignore[override]
        name, command, rest = super().resolve_command(ctx, args)
        # Checked up front: these commands would otherwise fail on whatever they miss first (a backbone plugin).
        if name in TRAINING_COMMANDS and "--help" not in rest and find_spec("torch") is None:
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return name, command, rest

    def invoke(self, ctx):  # type: ignore[override]
        tolerant_streams()
        with _one_line_errors():
            return super().invoke(ctx)


@contextmanager
def _one_line_errors():
    try:
        yield
    except CapcliError as exc:
        error(exc)
        raise typer.Exit(1) from None
    except NoArgsIsHelpError:
        raise  # click prints the help
    except UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        error(f"{exc.format_message()}{where}")
        raise typer.Exit(2) from None
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in TRAINING_STACK:
            raise
        error(NEEDS_TRAINING_STACK.format(module=exc.name))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        # Said of every command: nothing is left half-written, and what a command finished (cached features,
        # finished epochs) a rerun reuses; a synthetic set, built in a temporary folder, starts over.
        err.print("interrupted; nothing half-written was kept: rerun the same command to go on "
                  "(it reuses cached features and, for train with --resume, finished epochs)")
        raise typer.Exit(130) from None
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # a closed pipe (| head): click exits quietly
        # The last line of defence; the common cases are turned into clear messages where they happen.
        where = f": {exc.filename}" if exc.filename else ""
        error(f"{describe_os_error(exc)}{where}")
        raise typer.Exit(1) from None


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
app.command()(train.scst)
app.command("export")(export.export_cmd)
app.command()(caption.caption)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command()(demo.demo)
app.command()(serve.serve)
app.add_typer(data.app, name="data")
app.command()(inspect.inspect)
app.command()(doctor.doctor)
app.command("env", hidden=True)(doctor.doctor)


def main() -> None:
    app()
