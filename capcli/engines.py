"""Feature-extraction engines: a backbone's forward in PyTorch, or through ONNX Runtime on a cached graph.

An extractor is a callable: image batch [B,3,S,S] float32 (numpy, or a CPU tensor) -> features float32
numpy [B, ...]. The ONNX engine exports the backbone once per backbone + weights + preprocessing + opset +
output into the cache (written to a temporary file and renamed, so a killed export leaves nothing that
loads) and runs it with session options tuned for a CPU that DataLoader workers share.

A graph output is one named way of reading the backbone: today the pooled features; a spatial grid taken
before pooling can be added to `OUTPUTS` and is exported, cached and run the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from capcli.backbone import Backbone, weights_id
from capcli.errors import CapcliError
from capcli.paths import cache_root

if TYPE_CHECKING:
    from torch import nn

ENGINES = ("auto", "torch", "onnx")
GRAPH_FORMAT = "capcli-backbone-graph/1"
GRAPH_OPSET = 18
EXAMPLE_BATCH = 2  # a batch of 1 would let the exporter fix the batch dimension
GRAPH_REL_TOL = 1e-3  # max |torch - onnx| / max |torch| on the export's own example batch


@dataclass(frozen=True)
class GraphOutput:
    """One way of reading a backbone: the graph's output name and the module that computes it."""

    name: str
    build: Callable[[Backbone, str], nn.Module]


OUTPUTS: dict[str, GraphOutput] = {
    "pooled": GraphOutput("features", lambda backbone, weights: backbone.build(weights)),
}


def resolve_engine(engine: str, device: str) -> str:
    """'torch' or 'onnx' for a resolved device: 'auto' is ONNX Runtime on CPU, PyTorch on CUDA."""
    if engine not in ENGINES:
        raise CapcliError(f"unknown engine '{engine}'; use {', '.join(ENGINES)}")
    if engine == "auto":
        return "torch" if device.startswith("cuda") else "onnx"
    return engine


def default_workers(engine: str, device: str) -> int:
    """DataLoader workers when none are asked for: the CPU forward needs cores too."""
    cpus = os.cpu_count() or 1
    if device.startswith("cuda"):
        return min(8, cpus)
    return max(1, cpus // 2)


def record_engine(meta: dict, engine: str) -> bool:
    """Note in a feature cache's meta which engine computed its rows ('onnx', or 'onnx+torch' when a
    resumed run switched); True when the meta changed and must be written."""
    used = {e for e in str(meta.get("engine", "")).split("+") if e}
    recorded = "+".join(sorted(used | {engine}))
    if meta.get("engine") == recorded:
        return False
    meta["engine"] = recorded
    return True


# --- the cached graph ---------------------------------------------------------------------------


def graph_key(backbone: Backbone, weights: str, output: str, opset: int) -> str:
    ident = {
        "format": GRAPH_FORMAT,
        "backbone": backbone.name,
        "feature_dim": backbone.feature_dim,
        "weights": weights_id(weights),
        "preprocessing": backbone.preprocessing.to_dict(),
        "output": output,
        "opset": opset,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def graph_path(backbone: Backbone, weights: str, output: str = "pooled", opset: int = GRAPH_OPSET) -> Path:
    key = graph_key(backbone, weights, output, opset)
    return cache_root() / "graphs" / f"{backbone.name}-{output}-{key}.onnx"


def _output(output: str) -> GraphOutput:
    if output not in OUTPUTS:
        raise CapcliError(f"unknown backbone output '{output}'; known: {', '.join(OUTPUTS)}")
    return OUTPUTS[output]


def _example_batch(backbone: Backbone):
    import torch

    g = torch.Generator().manual_seed(0)
    s = backbone.input_size
    return torch.randn(EXAMPLE_BATCH, 3, s, s, generator=g)


def export_graph(backbone: Backbone, weights: str, output: str = "pooled", opset: int = GRAPH_OPSET) -> Path:
    """The backbone's ONNX graph for `output`, exported into the cache on first use; returns its path."""
    path = graph_path(backbone, weights, output, opset)
    if path.is_file():
        return path
    import torch

    from capcli.console import err
    from capcli.export import _check_graph, _export  # the bundle's exporter: same fallbacks, same checks

    spec = _output(output)
    module = spec.build(backbone, weights).eval()
    example = _example_batch(backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    axes = {"images": 0, spec.name: 0}
    try:
        with err.status(f"exporting {backbone.name} ({output}) to ONNX once, for ONNX Runtime extraction"):
            _export(module, (example,), tmp, ["images"], [spec.name], axes, opset)
            _check_graph(tmp, axes)
        with torch.inference_mode():
            expected = module(example).numpy()
        _check_agreement(backbone, tmp, spec.name, example.numpy(), expected)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_agreement(backbone: Backbone, graph: Path, output: str, example: np.ndarray, expected: np.ndarray) -> None:
    got = cpu_session(graph, threads=1).run([output], {"images": example})[0]
    scale = float(np.abs(expected).max()) or 1.0
    diff = float(np.abs(got - expected).max()) / scale
    if not diff <= GRAPH_REL_TOL:  # also catches NaN
        raise CapcliError(
            f"the ONNX graph of {backbone.name} disagrees with PyTorch (relative difference {diff:.1e}); "
            "use --engine torch"
        )


def cpu_session_options(threads: int):
    """Session options for a CPU whose cores DataLoader workers share."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Idle ORT threads spin-wait by default, burning the cores the image-loading workers need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def cpu_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), cpu_session_options(threads or os.cpu_count() or 1),
                                providers=["CPUExecutionProvider"])


# --- extractors ---------------------------------------------------------------------------------


class OnnxExtractor:
    """The backbone graph on ONNX Runtime."""

    engine = "onnx"

    def __init__(self, session, output: str):
        self.session, self.output = session, output

    def __call__(self, batch) -> np.ndarray:
        images = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        return self.session.run([self.output], {"images": images})[0]


class TorchExtractor:
    """The backbone module in PyTorch: channels-last, float16 autocast on CUDA."""

    engine = "torch"

    def __init__(self, module, device: str):
        import torch

        # channels_last: ~1.7x faster convolutions on CPU (oneDNN) and tensor cores alike.
        self.module = module.to(device, memory_format=torch.channels_last)
        self.device = device
        self.amp = device.startswith("cuda")

    def __call__(self, batch) -> np.ndarray:
        import torch

        x = torch.as_tensor(batch).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.amp, dtype=torch.float16):
            out = self.module(x)
        return out.float().cpu().numpy()


def _open_session(path: Path, device: str, threads: int | None):
    if device.startswith("cuda"):
        import onnxruntime as ort

        from capcli.runtime_onnx import choose_providers

        return ort.InferenceSession(str(path), providers=choose_providers("cuda"))
    return cpu_session(path, threads)


def onnx_session(backbone: Backbone, weights: str, output: str, device: str, threads: int | None = None):
    """An ONNX Runtime session on the cached graph (exported first if needed)."""
    path = export_graph(backbone, weights, output)
    try:
        return _open_session(path, device, threads)
    except CapcliError:
        raise
    except Exception as exc:  # the cached file was damaged after it was written: export it again, once
        from capcli.console import err

        err.print(f"cached graph {path} cannot be loaded ({type(exc).__name__}); exporting it again")
        path.unlink(missing_ok=True)
        return _open_session(export_graph(backbone, weights, output), device, threads)


def make_extractor(backbone: Backbone, weights: str, engine: str, device: str, output: str = "pooled",
                   threads: int | None = None):
    """The extractor for a resolved engine ('torch' or 'onnx') and device."""
    spec = _output(output)
    if engine == "onnx":
        return OnnxExtractor(onnx_session(backbone, weights, output, device, threads), spec.name)
    if engine == "torch":
        return TorchExtractor(spec.build(backbone, weights), device)
    raise CapcliError(f"unknown engine '{engine}'; use torch or onnx")
