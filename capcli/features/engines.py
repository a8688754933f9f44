"""Feature-extraction engines: a backbone's forward in PyTorch, or through ONNX Runtime on a cached graph.

An extractor is a callable: pixel batch uint8 [B,S,S,3] (resized and centre-cropped by `capcli.images`;
numpy, or a CPU tensor) -> features float32 numpy [B, ...]. The normalisation (scale, mean, std, to
channels-first) is part of the extractor, so the DataLoader workers only decode, resize and crop, and hand
over a quarter of the bytes. The ONNX engine exports the normalisation and the backbone once per backbone +
weights + preprocessing + opset + output into the cache (written to a temporary file and renamed, so a killed
export leaves nothing that loads) and runs it with session options tuned for a CPU that DataLoader workers
share.

A graph output is one named way of reading the backbone (`OUTPUTS`): its pooled features, or the spatial grid
taken before pooling for backbones that declare one; each is exported, cached and run the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
TRUNK = "trunk:"  # as capcli.features.cache names a split point's trunk output
GRAPH_FORMAT = "capcli-backbone-graph/2"  # bump when the graph's inputs or outputs change
GRAPH_OPSET = 18
EXAMPLE_BATCH = 2  # a batch of 1 would let the exporter fix the batch dimension
GRAPH_REL_TOL = 1e-3  # max |torch - onnx| / max |torch| on the export's own example batch


@dataclass(frozen=True)
class GraphOutput:
    """One way of reading a backbone: the graph's output name and the module that computes it."""

    name: str
    build: Callable[[Backbone, str], nn.Module]


OUTPUTS: dict[str, GraphOutput] = {
    "pooled": GraphOutput("features", lambda backbone, weights: backbone.build(weights)),  # [B, D]
    "grid": GraphOutput("grid", lambda backbone, weights: backbone.build_grid(weights)),  # [B, C, H, W]
}


def _normalised(backbone: Backbone, module: nn.Module) -> nn.Module:
    """`module` behind the backbone's normalisation: uint8 pixels [B,S,S,3] in, as `capcli.images.normalise`."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module
            self.register_buffer("mean", torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            # A channels-first view of channels-last memory: what the convolutions prefer anyway.
            x = pixels.permute(0, 3, 1, 2).float() / 255.0
            return self.module((x - self.mean) / self.std)

    return Normalised().eval()


def build_module(backbone: Backbone, weights: str, output: str = "pooled") -> nn.Module:
    """What an extractor computes, as a PyTorch module: pixels -> the backbone's `output`."""
    return _normalised(backbone, _output(output).build(backbone, weights))


def resolve_engine(engine: str, device: str) -> str:
    """'torch' or 'onnx' for a resolved device: 'auto' is ONNX Runtime on CPU, PyTorch on CUDA."""
    if engine not in ENGINES:
        raise CapcliError(f"unknown engine '{engine}'; use {', '.join(ENGINES)}")
    if engine == "auto":
        return "torch" if device.startswith("cuda") else "onnx"
    return engine


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
        "grid": backbone.grid.to_dict() if output == "grid" and backbone.grid else None,
        **({"trunk": backbone.split(output[len(TRUNK):]).trunk.to_dict()} if output.startswith(TRUNK) else {}),
        "opset": opset,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def graph_path(backbone: Backbone, weights: str, output: str = "pooled", opset: int = GRAPH_OPSET) -> Path:
    key = graph_key(backbone, weights, output, opset)
    return cache_root() / "graphs" / f"{backbone.name}-{output.replace(':', '-')}-{key}.onnx"


def _output(output: str) -> GraphOutput:
    if output.startswith(TRUNK) and len(output) > len(TRUNK):  # a split point's trunk: [B, C, H, W]
        split = output[len(TRUNK):]
        return GraphOutput("trunk", lambda backbone, weights: backbone.build_split(weights, split)[0])
    if output not in OUTPUTS:
        raise CapcliError(f"unknown backbone output '{output}'; known: {', '.join(OUTPUTS)}, {TRUNK}SPLIT")
    return OUTPUTS[output]


def example_pixels(backbone: Backbone, n: int = EXAMPLE_BATCH) -> np.ndarray:
    s = backbone.input_size
    return np.random.default_rng(0).integers(0, 256, size=(n, s, s, 3), dtype=np.uint8)


def export_graph(backbone: Backbone, weights: str, output: str = "pooled", opset: int = GRAPH_OPSET) -> Path:
    """The backbone's ONNX graph for `output`, exported into the cache on first use; returns its path."""
    path = graph_path(backbone, weights, output, opset)
    if path.is_file():
        return path
    import torch

    from capcli.console import err
    from capcli.onnx_graphs import check_graph, write_graph  # as the bundle's graphs: same fallbacks and checks

    name = _output(output).name
    module = build_module(backbone, weights, output)
    example = torch.from_numpy(example_pixels(backbone))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    axes = {"pixels": 0, name: 0}
    try:
        with err.status(f"exporting {backbone.name} ({output}) to ONNX once, for ONNX Runtime extraction"):
            write_graph(module, (example,), tmp, ["pixels"], [name], axes, opset, "dynamo")
            check_graph(tmp, axes)
        with torch.inference_mode():
            expected = module(example).numpy()
        _check_agreement(backbone, tmp, name, example.numpy(), expected)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_agreement(backbone: Backbone, graph: Path, output: str, example: np.ndarray, expected: np.ndarray) -> None:
    got = cpu_session(graph, threads=1).run([output], {"pixels": example})[0]
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


SMALL_CPU = 4  # up to this many cores, CPU extraction computes one single-threaded batch per core


def cpu_runs() -> int:
    """Batches ONNX Runtime computes at once during CPU extraction: one per core on a small CPU, each run
    single-threaded and the images loaded by the main thread in between (`capcli.features.extraction`); on larger
    CPUs one run over all cores, with loader worker processes.

    A run over all cores waits at every parallel step for its slowest thread, and while images are being
    loaded on the same few cores one thread is always the slowest. Measured on a 2-core CPU (efficientnet_lite0,
    batch 32): two single-threaded runs extract at 0.85-1.0x of a two-thread run's forward on ready tensors, one
    two-thread run fed by a loader process at 0.57-0.66x. Larger CPUs were not measured; their loading needs
    the worker processes."""
    cpus = os.cpu_count() or 1
    return cpus if cpus <= SMALL_CPU else 1


class OnnxExtractor:
    """The backbone graph on ONNX Runtime; `runs` batches may be computed at once (`submit`)."""

    engine = "onnx"

    def __init__(self, session, output: str, runs: int = 1):
        self.session, self.output, self.runs = session, output, runs
        self._pool = ThreadPoolExecutor(runs, thread_name_prefix="capcli-onnx") if runs > 1 else None

    def __call__(self, pixels) -> np.ndarray:
        return self.session.run([self.output], {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})[0]

    def submit(self, pixels) -> Future:
        """The features of `pixels`, computed beside the caller (ONNX Runtime releases the GIL)."""
        return self._pool.submit(self, pixels) if self._pool else _done(self, pixels)


class TorchExtractor:
    """The normalised backbone in PyTorch: channels-last, float16 autocast on CUDA."""

    engine = "torch"
    runs = 1  # PyTorch parallelises within a batch

    def __init__(self, module, device: str):
        import torch

        # channels_last: ~1.7x faster convolutions on CPU (oneDNN) and tensor cores alike.
        self.module = module.to(device, memory_format=torch.channels_last)
        self.device = device
        self.amp = device.startswith("cuda")

    def __call__(self, pixels) -> np.ndarray:
        import torch

        x = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.amp, dtype=torch.float16):
            out = self.module(x)
        return out.float().cpu().numpy()

    def submit(self, pixels) -> Future:
        return _done(self, pixels)


def _done(extractor, pixels) -> Future:
    """A future already holding the extractor's result (or its error), computed now."""
    future: Future = Future()
    try:
        future.set_result(extractor(pixels))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _open_session(path: Path, device: str, threads: int | None, output: str):
    if device.startswith("cuda"):
        import onnxruntime as ort

        from capcli.providers import choose_providers

        session = ort.InferenceSession(str(path), providers=choose_providers("cuda"))
    else:
        session = cpu_session(path, threads)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (["pixels"], [_output(output).name]):
        raise ValueError(f"unexpected inputs/outputs {names}")
    return session


def onnx_session(backbone: Backbone, weights: str, output: str, device: str, threads: int | None = None):
    """An ONNX Runtime session on the cached graph (exported first if needed)."""
    path = export_graph(backbone, weights, output)
    try:
        return _open_session(path, device, threads, output)
    except CapcliError:
        raise
    except Exception as exc:  # the cached file was damaged after it was written: export it again, once
        from capcli.console import err

        err.print(f"cached graph {path} cannot be loaded ({type(exc).__name__}); exporting it again")
        path.unlink(missing_ok=True)
        return _open_session(export_graph(backbone, weights, output), device, threads, output)


def make_extractor(backbone: Backbone, weights: str, engine: str, device: str, output: str = "pooled",
                   threads: int | None = None):
    """The extractor for a resolved engine ('torch' or 'onnx') and device."""
    if engine == "onnx":
        runs = cpu_runs() if device == "cpu" and threads is None else 1
        if runs > 1:
            threads = 1  # one single-threaded session shared by the runs: the weights are held once
        return OnnxExtractor(onnx_session(backbone, weights, output, device, threads), _output(output).name, runs)
    if engine == "torch":
        return TorchExtractor(build_module(backbone, weights, output), device)
    raise CapcliError(f"unknown engine '{engine}'; use torch or onnx")
