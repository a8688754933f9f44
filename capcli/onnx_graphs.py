"""A torch module becomes a checked ONNX file: the exporters (torch.export first, TorchScript as the fallback),
a symbolic batch dimension asserted on every input and output, and capcli's metadata stamped into the graph.
torch is imported only to export.

The bundle's encoder and decoder and the backbones' feature-extraction graphs are all written here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path

from capcli.errors import CapcliError


def dynamic_dims(model_path: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    dims = {}
    for value in list(model.graph.input) + list(model.graph.output):
        dims[value.name] = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return dims


EXPORTERS = ("dynamo", "torchscript")


def check_exporter(exporter: str) -> str:
    """The exporter asked for, if it can run: "dynamo" (torch.export, the one PyTorch develops; the
    default) needs onnxscript; "torchscript" is the older exporter, faster to run on small graphs."""
    if exporter not in EXPORTERS:
        raise CapcliError(f"unknown exporter '{exporter}'; use {' or '.join(EXPORTERS)}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise CapcliError("the dynamo exporter needs onnxscript (pip install onnxscript, part of capcli[train]); "
                          "or pass --exporter torchscript")
    return exporter


def write_graph(module, args, path: Path, names_in, names_out, batch_axes: dict[str, int], opset: int,
            exporter: str) -> tuple[str, str | None]:
    """Export with a symbolic batch; returns (exporter used, why the TorchScript fallback was needed).

    Some graphs only the TorchScript exporter handles: then it is used quietly and the reason is recorded.
    """
    import torch

    module.eval()
    fallback = None
    if exporter == "dynamo":
        try:
            _export_dynamo(module, args, path, names_in, names_out, batch_axes, opset)
            return "dynamo", None
        except OSError:
            raise  # a full disk or a lost folder is not a tracing problem: the other exporter would fail too
        except Exception as exc:  # anything torch.export cannot trace: the other exporter may still work
            lines = str(exc).strip().splitlines()
            fallback = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")
            path.unlink(missing_ok=True)
    axes = {n: {batch_axes[n]: "batch"} for n in list(names_in) + list(names_out)}
    with _quiet():
        torch.onnx.export(
            module, args, str(path), dynamo=False, dynamic_axes=axes, opset_version=opset,
            input_names=names_in, output_names=names_out,
        )
    return "torchscript", fallback


def _export_dynamo(module, args, path: Path, names_in, names_out, batch_axes: dict[str, int], opset: int) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    shapes = tuple({batch_axes[n]: batch} for n in names_in)
    with _quiet():
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
            input_names=names_in, output_names=names_out, verbose=False, report=False,
        )
        program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and progress lines are about their internals, not the user's model."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def stamp_graph(path: Path, props: dict[str, str]) -> None:
    """Write capcli's metadata into a graph, so a graph from another model is recognised on load."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def check_graph(path: Path, batch_axes: dict[str, int]) -> None:
    import onnx

    onnx.checker.check_model(str(path))
    for name, dims in dynamic_dims(path).items():
        axis = batch_axes.get(name)
        if axis is not None and not isinstance(dims[axis], str):
            raise CapcliError(f"export of {path.name} fixed the batch dimension of '{name}' to {dims[axis]}")


def copy_metadata(src: Path, dst: Path) -> None:
    """Add `src`'s metadata (capcli's stamp naming the model and vocabulary) to the graph `dst`."""
    import onnx

    source = onnx.load(str(src), load_external_data=False)
    model = onnx.load(str(dst), load_external_data=False)
    have = {p.key for p in model.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, str(dst))
