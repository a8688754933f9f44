"""int8 bundles: the encoder quantized statically, the decoder's matrix products dynamically, judged by captions.

Encoder: QDQ format, int8 weights per output channel, uint8 activations whose ranges are calibrated on images
of the run's training split (ONNX Runtime fuses the pairs into QLinearConv / QGemm kernels); a MobileNet-style
stem stays float32 (`float_stem`), 3x3 box-filter pools become depthwise convs
(`box_filters_as_convs`), and each conv's int32 bias is corrected for the mean shift rounding causes
(`capcli.bundle.bias_correction`). Decoder: int8 weights for MatMul/Gemm, activations quantized on the fly
(MatMulInteger). Graph inputs and outputs stay float32 with the same names and symbolic batch, so captioning and
serving use an int8 bundle unchanged. Dynamic quantization takes one activation scale per tensor, i.e. over the
whole batch being decoded: an int8 decoder's words can depend on which other images (and beams) share its batch,
which a float one's do not.

What a user cares about is the captions, not allclose: a sample of validation images is captioned with the
float graphs and with the int8 ones; the share of identical captions and the change in BLEU-4 / CIDEr-D go
into capcli.json, and a bundle that loses more than the tolerance is refused.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from capcli.backbone import Preprocessing
from capcli.bundle import manifest
from capcli.bundle.bias_correction import correct_biases
from capcli.bundle.float16 import float16_bundle
from capcli.bundle.judge import (
    DEFAULT_PARITY_IMAGES,
    GRAPH_FILES,
    Tolerance,
    converter_errors,
    replace_if_close,
    run_dataset,
)
from capcli.errors import CapcliError
from capcli.onnx_graphs import copy_metadata
from capcli.paths import atomic_write_json

MODES = ("int8", "float16")  # float16: weights stored as float16, computed in float32 (half the bytes)
DEFAULT_CALIBRATION = 300  # training images whose activation ranges calibrate the encoder
CALIBRATION_BATCH = 8
STEM_CONVS = 3  # how far into the encoder a depthwise conv counts as part of the stem


def check_request(mode: str | None, calibration: int | None, tolerance: Tolerance | None = None) -> None:
    """Bad quantization options end the export before any work."""
    if mode is not None and mode not in MODES:
        raise CapcliError(f"unknown quantization '{mode}'; use {', '.join(MODES)}")
    if tolerance is not None and mode is None:
        raise CapcliError("--min-agreement and --max-cider-loss need --quantize int8 or float16")
    if calibration is not None and (mode != "int8" or calibration < 1):
        raise CapcliError("--calibration needs --quantize int8" if mode != "int8"
                          else f"--calibration needs at least 1 image, got {calibration}")


def calibration_images(ds, count: int, seed: int = 0) -> list[Path]:
    """`count` images drawn (seeded) from the training split, readable ones only."""
    names = [n for n in ds.splits.get("train", []) if ds.image_path(n).is_file()]
    if not names:
        raise CapcliError("the run's training split has no images to calibrate the int8 encoder with")
    random.Random(seed).shuffle(names)
    return [ds.image_path(n) for n in names[:count]]


# --- quantizing the graphs ----------------------------------------------------------------------


class _CalibrationReader:
    """Feeds preprocessed calibration images to ONNX Runtime's calibrator, a batch at a time."""

    def __init__(self, paths: list[Path], prep: Preprocessing, input_name: str):
        self.paths, self.prep, self.input_name, self.next = paths, prep, input_name, 0
        self.read = 0

    def get_next(self) -> dict | None:
        from capcli.images import ImageError, load_input

        batch, problem = [], None
        while self.next < len(self.paths) and len(batch) < CALIBRATION_BATCH:
            try:
                batch.append(load_input(self.paths[self.next], self.prep))
            except ImageError as exc:
                problem = problem or exc  # an unreadable training image calibrates nothing
            self.next += 1
        self.read += len(batch)
        if not batch and not self.read:
            raise CapcliError(f"none of the {len(self.paths)} calibration images of the training split could be "
                              f"read (e.g. {problem}); bundle not written")
        return {self.input_name: np.stack(batch)} if batch else None

    def rewind(self) -> None:
        self.next = self.read = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch


@contextlib.contextmanager
def _quiet():
    """The quantizer's warnings, log lines (on the root logger) and prints are about ONNX Runtime's internals,
    e.g. a per-channel axis that a 1-D weight lacks (it is then quantized per tensor)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _preprocessed(src: Path, dst: Path) -> Path:
    """Shape inference and graph clean-up that ONNX Runtime's quantizer expects before it runs."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        quant_pre_process(str(src), str(dst))
    return dst


def float_stem(graph) -> list[str]:
    """The convs kept float32: in a MobileNet-style stem (EfficientNet-Lite, MobileNet), those up to and
    including the first depthwise conv. Measured on a demo run of efficientnet_lite0 (200 validation images,
    encoder int8, decoder float): captions agree with the float bundle's 63 % of the time with every conv
    quantized, 89.5 % with these two float (CIDEr-D -6.6 % vs -0.5 %); they are ~4 % of its multiply-adds.
    Backbones without depthwise convs (vgg16, resnet152, inceptionv3) keep none."""
    convs = [n for n in graph.node if n.op_type == "Conv"]
    for index, node in enumerate(convs[:STEM_CONVS]):
        if any(a.name == "group" and a.i > 1 for a in node.attribute):
            return [c.name for c in convs[: index + 1]]
    return []


def box_filters_as_convs(model) -> int:
    """Rewrite 3x3 stride-1 average pools that count their zero padding (inceptionv3's branch pools) as the
    depthwise convs they equal (weights 1/9), in place; returns how many. ONNX Runtime's int8 kernel for such a
    pool (QLinearAveragePool) took 39 % of inceptionv3's int8 encoder time, while an int8 depthwise conv is one
    of its fast kernels: 1.83x -> 2.66x over float32 on one measured batch of 8. Pools whose channel count shape
    inference did not record are left as they are."""
    from onnx import helper, numpy_helper

    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        channels = _box_filter_channels(node, known)
        if channels is None:
            nodes.append(node)
            continue
        weight = numpy_helper.from_array(np.full((channels, 1, 3, 3), 1 / 9, np.float32), node.name + "_box")
        model.graph.initializer.append(weight)
        nodes.append(helper.make_node("Conv", [node.input[0], weight.name], list(node.output),
                                      name=node.name + "_as_conv", group=channels, kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1], strides=[1, 1]))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def _box_filter_channels(node, known: dict) -> int | None:
    from onnx import helper

    if node.op_type != "AveragePool":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (list(attrs.get("kernel_shape", [])) != [3, 3] or list(attrs.get("strides", [1, 1])) != [1, 1]
            or list(attrs.get("pads", [0, 0, 0, 0])) != [1, 1, 1, 1] or attrs.get("count_include_pad", 0) != 1
            or attrs.get("ceil_mode", 0) != 0 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    value = known.get(node.input[0])
    dims = value.type.tensor_type.shape.dim if value is not None else []
    return dims[1].dim_value if len(dims) == 4 and dims[1].dim_value > 0 else None


def quantize_encoder(src: Path, dst: Path, images: list[Path], prep: Preprocessing, work: Path) -> dict:
    """Static QDQ quantization: per-channel int8 weights, uint8 activations calibrated (min/max) on `images`,
    then each conv's bias corrected for the mean shift quantization causes (capcli.bundle.bias_correction); returns
    what was kept float32 (`float_stem`), how many pools became convs (`box_filters_as_convs`) and how many
    biases were corrected."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ready = _preprocessed(src, work / "encoder.pre.onnx")
    model = onnx.load(str(ready))
    kept_float = float_stem(model.graph)
    pools = box_filters_as_convs(model)
    if pools:
        onnx.save(model, str(ready))
    del model
    reader = _CalibrationReader(images, prep, "images")
    with _quiet():
        quantize_static(
            str(ready), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=kept_float,
            calibration_providers=["CPUExecutionProvider"],
        )
    reader.rewind()
    corrected = correct_biases(ready, dst, [image for batch in reader for image in batch["images"]])
    return {"float_convs": kept_float, "pools_as_convs": pools, "bias_corrected_convs": corrected}


def quantize_decoder(src: Path, dst: Path, work: Path) -> None:
    """Dynamic quantization of the step graph's matrix products: int8 weights, activations per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ready = _preprocessed(src, work / "decoder.pre.onnx")
    with _quiet():
        quantize_dynamic(str(ready), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)


# --- the whole step -----------------------------------------------------------------------------


def quantize_bundle(folder: Path, mode: str = "int8", calibration: int | None = None,
                    tolerance: Tolerance | None = None, parity_images: int = DEFAULT_PARITY_IMAGES) -> dict:
    """Turn the float bundle in `folder` into an int8 (or float16-stored) one, in place: its graphs replaced, its
    manifest given the conversion's figures and the new hashes. Raises CapcliError, leaving `folder` as it was,
    when the captions lose more than `tolerance`. Returns the manifest's `quantization` entry."""
    check_request(mode, calibration, tolerance)
    meta = manifest.read_manifest(folder)
    vocab = manifest.load_vocabulary(folder, meta)
    tolerance = tolerance or Tolerance()
    if mode == "float16":
        quantization = float16_bundle(folder, meta, vocab, tolerance)
    else:
        quantization = _int8_bundle(folder, meta, vocab, calibration or DEFAULT_CALIBRATION, tolerance, parity_images)
    meta["quantization"] = quantization
    meta["sha256"] = manifest.hash_files(folder)
    manifest.validate_manifest(meta)
    atomic_write_json(folder / manifest.MANIFEST, manifest.sealed(meta))
    return quantization


def _int8_bundle(folder: Path, meta: dict, vocab, calibration: int, tolerance: Tolerance, parity_images: int) -> dict:
    prep = Preprocessing.from_dict(meta["preprocessing"])
    images = calibration_images(run_dataset(meta), calibration, seed=int(meta["dataset"].get("seed") or 0))
    work = folder / ".int8"
    work.mkdir()
    try:
        enc, dec = folder / "encoder.onnx", folder / "decoder.onnx"
        with converter_errors("encoder.onnx"):
            encoder_changes = quantize_encoder(enc, work / "encoder.onnx", images, prep, work)
        with converter_errors("decoder.onnx"):
            quantize_decoder(dec, work / "decoder.onnx", work)
        for name in GRAPH_FILES:  # the stamp naming the model and vocabulary, as before
            copy_metadata(folder / name, work / name)
        parity, sizes = replace_if_close(folder, work, meta, vocab, tolerance, "int8", parity_images)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "mode": "int8",
        "encoder": "static, QDQ, per-channel int8 weights, uint8 activations (min/max calibration), "
                   "conv biases corrected for quantization's mean shift",
        "encoder_float_convs": encoder_changes["float_convs"],
        "encoder_bias_corrected_convs": encoder_changes["bias_corrected_convs"],
        "encoder_pools_as_convs": encoder_changes["pools_as_convs"],
        "decoder": "dynamic, int8 MatMul/Gemm weights",
        "calibration_images": len(images),
        "calibration_split": "train",
        "graph_bytes": sizes,
        "parity": parity,
        "tolerance": asdict(tolerance),
    }
