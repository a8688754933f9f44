"""capcli.bundle.bias_correction: where the graph is cut, and that each int8 conv's mean output is brought back to the
float graph's, changing nothing but biases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from capcli.backbone import Preprocessing
from capcli.bundle.bias_correction import (
    _channel_means,
    _outputs_also,
    _session,
    correct_biases,
    cuts,
    quantized_convs,
)
from capcli.images import load_input

PREP = Preprocessing(input_size=32, resize=36)


def test_cuts_are_where_one_tensor_carries_the_rest():
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="weight"),  # constant: not live
        helper.make_node("Conv", ["x", "w"], ["a"], name="A"),
        helper.make_node("Conv", ["a", "w"], ["b"], name="B"),
        helper.make_node("Add", ["a", "b"], ["c"], name="residual"),  # a is live until here: no cut at b
        helper.make_node("Conv", ["c", "w"], ["d"], name="C"),
        helper.make_node("Relu", ["d"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int8), "w_q"),
         numpy_helper.from_array(np.array(1.0, np.float32), "w_scale")])
    assert [t for _, t in cuts(graph)] == ["x", "a", "c", "d"]
    assert [i for i, _ in cuts(graph)] == [-1, 1, 3, 4]


def _net():
    """A stem, an inverted residual block and a head: pieces with one conv and one with three."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU6())
            self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU6())
            self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6())
            self.project = nn.Conv2d(32, 16, 1)
            self.head = nn.Sequential(nn.Conv2d(16, 24, 1), nn.ReLU6())

        def forward(self, x):
            x = self.stem(x)
            return self.head(x + self.project(self.depthwise(self.expand(x))))

    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, small_synthetic):
    """The float graph, its int8 graph as the quantizer writes it, and that graph bias-corrected."""
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from capcli.bundle.quantize import _CalibrationReader, _preprocessed, _quiet

    tmp = tmp_path_factory.mktemp("bias")
    src = tmp / "float.onnx"
    torch.onnx.export(_net(), (torch.randn(2, 3, 32, 32),), str(src), input_names=["images"],
                      output_names=["out"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    ready = _preprocessed(src, tmp / "ready.onnx")
    paths = sorted((small_synthetic / "Images").glob("*.jpg"))
    calibration, held_out = paths[:32], paths[32:64]
    with _quiet():
        quantize_static(str(ready), str(tmp / "int8.onnx"), _CalibrationReader(calibration, PREP, "images"),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    shutil.copy(tmp / "int8.onnx", tmp / "corrected.onnx")
    images = [load_input(p, PREP) for p in calibration]
    corrected = correct_biases(ready, tmp / "corrected.onnx", images)
    return {"float": ready, "int8": tmp / "int8.onnx", "corrected": tmp / "corrected.onnx", "count": corrected,
            "images": images, "held_out": [load_input(p, PREP) for p in held_out]}


def _conv_means(path: Path, images: list[np.ndarray], convs: list[str]) -> dict[str, np.ndarray]:
    """Each named conv's mean output per channel, quantization simulated in float."""
    model = onnx.load(str(path))
    outputs = [next(n.output[0] for n in model.graph.node if n.name == c) for c in convs]
    means = _channel_means(_session(_outputs_also(model, outputs)), "images", [np.stack(images)], outputs)
    return {c: means[o] for c, o in zip(convs, outputs, strict=True)}


def test_every_int8_conv_has_its_float_mean_back(graphs):
    model = onnx.load(str(graphs["int8"]))
    convs = [c.name for c in quantized_convs(model.graph)]
    assert graphs["count"] == len(convs) == 5
    inits = {i.name: i for i in model.graph.initializer}
    step = {c.name: numpy_helper.to_array(inits[c.input[2] + "_quantized_scale"]) for c in quantized_convs(model.graph)}
    target = _conv_means(graphs["float"], graphs["images"], convs)
    before = _conv_means(graphs["int8"], graphs["images"], convs)
    after = _conv_means(graphs["corrected"], graphs["images"], convs)
    for conv in convs:
        # What is left is the rounding of the int32 bias (half its step) and float summation.
        assert np.all(np.abs(after[conv] - target[conv]) <= 0.5 * step[conv] + 1e-5), conv
    shifted = [c for c in convs if np.max(np.abs(before[c] - target[c]) / step[c]) > 2]
    assert shifted, "the uncorrected graph had no mean shift to take out: the test shows nothing"


def test_only_biases_change(graphs):
    a, b = onnx.load(str(graphs["int8"])), onnx.load(str(graphs["corrected"]))
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    changed = {i.name for i, j in zip(a.graph.initializer, b.graph.initializer, strict=True)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))}
    assert changed == {c.input[2] + "_quantized" for c in quantized_convs(a.graph)}


def test_held_out_outputs_move_closer_to_float(graphs):
    """On images the correction never saw, with ONNX Runtime's int8 kernels, the int8 graph's output is nearer
    the float graph's on average and per channel."""
    import onnxruntime as ort

    x = np.stack(graphs["held_out"])
    out = {k: ort.InferenceSession(str(graphs[k]), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
           for k in ("float", "int8", "corrected")}
    shift = {k: np.abs((out[k] - out["float"]).mean(axis=(0, 2, 3))).mean() for k in ("int8", "corrected")}
    error = {k: np.abs(out[k] - out["float"]).mean() for k in ("int8", "corrected")}
    assert shift["corrected"] < 0.7 * shift["int8"], shift  # measured: 0.54x
    assert error["corrected"] < error["int8"], error
