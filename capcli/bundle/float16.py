"""float16 bundles: every large float32 weight stored as float16 and cast back to float32 when the graph loads,
so the graphs are half the size and compute exactly as before with weights rounded; judged by captions like
int8 (`capcli.bundle.judge`).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from capcli.bundle.judge import GRAPH_FILES, Tolerance, converter_errors, replace_if_close
from capcli.onnx_graphs import copy_metadata


def float16_weights(src: Path, dst: Path, min_elements: int = 1024) -> int:
    """The graph with its float32 weights stored as float16, each cast back to float32 by a Cast node.

    ONNX Runtime folds a Cast of a constant when it loads the graph, so the session computes in float32
    exactly as before, with weights rounded to float16: half the file for the same speed. Small tensors
    (biases, norms, shapes) stay float32. Returns how many weights were stored as float16.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    casts, kept = [], []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}__float16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}__to_float32"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)  # the casts first: every node after them reads their outputs
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return len(casts)


def float16_bundle(folder: Path, meta: dict, vocab, tolerance: Tolerance) -> dict:
    """Store the float bundle's weights in `folder` as float16, judged by captions; returns capcli.json's figures."""
    work = folder / ".float16"
    work.mkdir()
    try:
        stored = {}
        for name in GRAPH_FILES:
            with converter_errors(name):
                stored[name] = float16_weights(folder / name, work / name)
            copy_metadata(folder / name, work / name)
        parity, sizes = replace_if_close(folder, work, meta, vocab, tolerance, "float16")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "mode": "float16",
        "encoder": "weights stored as float16, computed in float32",
        "decoder": "weights stored as float16, computed in float32",
        "float16_weights": stored,
        "graph_bytes": sizes,
        "parity": parity,
        "tolerance": asdict(tolerance),
    }
