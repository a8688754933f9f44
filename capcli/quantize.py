"""int8 bundles: the encoder quantized statically, the decoder's matrix products dynamically, judged by captions.

Encoder: QDQ format, int8 weights per output channel, uint8 activations whose ranges are calibrated on images
of the run's training split (ONNX Runtime fuses the pairs into QLinearConv / QGemm kernels); a MobileNet-style
stem stays float32 (`float_stem`), 3x3 box-filter pools become depthwise convs
(`box_filters_as_convs`), and each conv's int32 bias is corrected for the mean shift rounding causes
(`capcli.bias_correction`). Decoder: int8 weights for MatMul/Gemm, activations quantized on the fly
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
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from capcli.backbone import Preprocessing
from capcli.bias_correction import correct_biases
from capcli.errors import CapcliError

MODES = ("int8", "float16")  # float16: weights stored as float16, computed in float32 (half the bytes)
DEFAULT_CALIBRATION = 300  # training images whose activation ranges calibrate the encoder
DEFAULT_PARITY_IMAGES = 200  # validation images captioned by both bundles
PARITY_BEAM = 3  # captions are compared as `capcli caption` makes them by default:
PARITY_BATCH = 8  # beam 3, 8 images decoded together (the int8 decoder's rounding depends on the batch, below)
CALIBRATION_BATCH = 8
STEM_CONVS = 3  # how far into the encoder a depthwise conv counts as part of the stem


@dataclass(frozen=True)
class Tolerance:
    """What an int8 bundle may lose against the float one on the validation sample."""

    min_agreement: float = 90.0  # % of images whose caption is identical
    max_cider_loss: float = 3.0  # % of the float bundle's CIDEr-D

    def describe(self) -> str:
        return f"captions agree >= {self.min_agreement:g}%, CIDEr-D loss <= {self.max_cider_loss:g}%"


def check_request(mode: str | None, calibration: int | None, tolerance: Tolerance | None = None) -> None:
    """Bad quantization options end the export before any work."""
    if mode is not None and mode not in MODES:
        raise CapcliError(f"unknown quantization '{mode}'; use {', '.join(MODES)}")
    if tolerance is not None and mode is None:
        raise CapcliError("--min-agreement and --max-cider-loss need --quantize int8 or float16")
    if calibration is not None and (mode != "int8" or calibration < 1):
        raise CapcliError("--calibration needs --quantize int8" if mode != "int8"
                          else f"--calibration needs at least 1 image, got {calibration}")


# --- images of the run's dataset --------------------------------------------------------------


def run_dataset(ckpt: dict):
    """The dataset a checkpoint was trained on, split as it was."""
    from capcli.data.readers import load_dataset

    tc = ckpt["train_config"]
    try:
        return load_dataset(tc["dataset"], images=tc.get("images"), seed=tc.get("seed", 0))
    except CapcliError as exc:
        raise CapcliError(f"cannot find the run's dataset to quantize with ({exc})") from None


def calibration_images(ds, count: int, seed: int = 0) -> list[Path]:
    """`count` images drawn (seeded) from the training split, readable ones only."""
    names = [n for n in ds.splits.get("train", []) if ds.image_path(n).is_file()]
    if not names:
        raise CapcliError("the run's training split has no images to calibrate the int8 encoder with")
    random.Random(seed).shuffle(names)
    return [ds.image_path(n) for n in names[:count]]


def parity_sample(ds, count: int) -> list[str]:
    """The first `count` readable validation images (the test split when there is no validation split)."""
    split = ds.splits.get("val") or ds.splits.get("test") or []
    names = [n for n in split if ds.image_path(n).is_file()][:count]
    if len(names) < 2:
        raise CapcliError("the run's dataset has too few validation images to judge an int8 bundle")
    return names


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
    then each conv's bias corrected for the mean shift quantization causes (capcli.bias_correction); returns
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


def _copy_metadata(src: Path, dst: Path) -> None:
    import onnx

    source = onnx.load(str(src), load_external_data=False)
    model = onnx.load(str(dst), load_external_data=False)
    have = {p.key for p in model.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, str(dst))


# --- judging by captions ------------------------------------------------------------------------


class GraphCaptioner:
    """A captioner over an encoder and a step graph on ONNX Runtime's CPU provider (see capcli.caption).

    `context` names the encoder outputs an attention step also reads (empty for a pooled decoder)."""

    state_batch_axes = (1, 1)  # h and c are [layers, batch, hidden]
    grid = None  # attention maps are not compared

    def __init__(self, encoder: Path, decoder: Path, vocab, prep: Preprocessing, max_len: int,
                 context: tuple[str, ...] = ()):
        import onnxruntime as ort

        from capcli.runtime_onnx import OnnxStep

        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(encoder), providers=providers)
        self.output_names = [o.name for o in self.encoder.get_outputs()]
        self.context_names = tuple(context)
        self.step = OnnxStep(ort.InferenceSession(str(decoder), providers=providers), decoder.name,
                             self.context_names)
        self.vocab, self.preprocessing, self.max_len = vocab, prep, max_len

    def start(self, images: np.ndarray):
        outputs = dict(zip(self.output_names, self.encoder.run(None, {"images": images.astype(np.float32)}),
                           strict=True))
        return (outputs["h0"], outputs["c0"]), tuple(outputs[n] for n in self.context_names)

    def encode(self, images: np.ndarray):
        return self.start(images)[0]


def caption_sample(captioner, ds, names: list[str]) -> dict[str, str]:
    from capcli.caption import caption_images

    results = caption_images(captioner, [ds.image_path(n) for n in names], beam_size=PARITY_BEAM,
                             batch_size=PARITY_BATCH)
    return {n: r.caption or "" for n, r in zip(names, results, strict=True) if r.error is None}


def caption_parity(ds, float_caps: dict[str, str], int8_caps: dict[str, str], label: str = "int8") -> dict:
    """Agreement % and BLEU-4 / CIDEr-D of both bundles' captions against the references (the second's under
    `label`, the mode)."""
    from capcli.metrics import score_captions

    names = [n for n in float_caps if n in int8_caps]
    refs = {n: ds.captions[n] for n in names}
    scores = {}
    for name, caps in (("float32", float_caps), (label, int8_caps)):
        s = score_captions(refs, {n: caps[n] for n in names}, meteor=False, tokenizer="simple").values
        scores[name] = {"BLEU-4": s["BLEU-4"], "CIDEr-D": s["CIDEr-D"]}
    cider_f, cider_q = scores["float32"]["CIDEr-D"], scores[label]["CIDEr-D"]
    return {
        "images": len(names),
        "beam_size": PARITY_BEAM,
        "tokenizer": "simple",
        "agreement_percent": 100.0 * sum(float_caps[n] == int8_caps[n] for n in names) / len(names),
        "scores": scores,
        "cider_loss_percent": 100.0 * (cider_f - cider_q) / cider_f if cider_f > 0 else 0.0,
        "bleu4_difference": scores[label]["BLEU-4"] - scores["float32"]["BLEU-4"],
    }


def verdict(parity: dict, tolerance: Tolerance, label: str = "int8") -> str | None:
    """Why the int8 (or float16) bundle is refused, or None when it is within tolerance."""
    agreement, loss = parity["agreement_percent"], parity["cider_loss_percent"]
    if agreement >= tolerance.min_agreement and loss <= tolerance.max_cider_loss:
        return None
    s = parity["scores"]
    return (
        f"the {label} bundle loses too much on {parity['images']} validation images: captions agree "
        f"{agreement:.1f}%, CIDEr-D {s[label]['CIDEr-D']:.1f} vs {s['float32']['CIDEr-D']:.1f} float "
        f"({0.0 - loss:+.1f}%); "
        f"tolerance: {tolerance.describe()}; bundle not written"
    )


# --- the whole step -----------------------------------------------------------------------------


@contextlib.contextmanager
def _quantizer_errors(name: str):
    """The quantizer's own failures (a graph it cannot handle, no readable calibration image) as one line."""
    try:
        yield
    except (OSError, CapcliError):
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise CapcliError(f"cannot quantize {name}: {type(exc).__name__}: {lines[0][:200] if lines else ''}; "
                          "bundle not written") from None


def _graph_names(ckpt: dict):
    from capcli import decoders
    from capcli.export import GRAPHS

    return GRAPHS[decoders.kind_of(ckpt)]


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


def quantize_bundle(folder: Path, ckpt: dict, prep: Preprocessing, vocab, calibration: int | None = None,
                    tolerance: Tolerance | None = None, parity_images: int = DEFAULT_PARITY_IMAGES,
                    mode: str = "int8") -> dict:
    """Replace the float graphs in `folder` (a bundle being written) by int8 (or float16-stored) ones; returns the
    figures for capcli.json. Raises CapcliError, leaving `folder` as it was, when the captions lose too much."""
    if mode == "float16":
        return _float16_bundle(folder, ckpt, prep, vocab, tolerance or Tolerance(), parity_images)
    calibration = calibration or DEFAULT_CALIBRATION
    tolerance = tolerance or Tolerance()
    ds = run_dataset(ckpt)
    images = calibration_images(ds, calibration, seed=int(ckpt["train_config"].get("seed", 0)))
    sample = parity_sample(ds, parity_images)
    max_len = int(ckpt["max_len"])
    context = _graph_names(ckpt).context
    work = folder / ".int8"
    work.mkdir()
    try:
        enc, dec = folder / "encoder.onnx", folder / "decoder.onnx"
        with _quantizer_errors("encoder.onnx"):
            encoder_changes = quantize_encoder(enc, work / "encoder.onnx", images, prep, work)
        with _quantizer_errors("decoder.onnx"):
            quantize_decoder(dec, work / "decoder.onnx", work)
        for name in ("encoder.onnx", "decoder.onnx"):  # the stamp naming the model and vocabulary, as before
            _copy_metadata(folder / name, work / name)
        float_caps = caption_sample(GraphCaptioner(enc, dec, vocab, prep, max_len, context), ds, sample)
        int8_caps = caption_sample(
            GraphCaptioner(work / "encoder.onnx", work / "decoder.onnx", vocab, prep, max_len, context), ds, sample)
        parity = caption_parity(ds, float_caps, int8_caps)
        refusal = verdict(parity, tolerance)
        if refusal:
            raise CapcliError(refusal)
        sizes = {"float32": enc.stat().st_size + dec.stat().st_size}
        os.replace(work / "encoder.onnx", enc)
        os.replace(work / "decoder.onnx", dec)
        sizes["int8"] = enc.stat().st_size + dec.stat().st_size
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


def _float16_bundle(folder: Path, ckpt: dict, prep: Preprocessing, vocab, tolerance: Tolerance,
                    parity_images: int) -> dict:
    """As `quantize_bundle` for float16-stored weights: no calibration, judged by captions the same way."""
    ds = run_dataset(ckpt)
    sample = parity_sample(ds, parity_images)
    max_len, context = int(ckpt["max_len"]), _graph_names(ckpt).context
    work = folder / ".float16"
    work.mkdir()
    try:
        enc, dec = folder / "encoder.onnx", folder / "decoder.onnx"
        stored = {}
        for name in ("encoder.onnx", "decoder.onnx"):
            with _quantizer_errors(name):
                stored[name] = float16_weights(folder / name, work / name)
            _copy_metadata(folder / name, work / name)
        float_caps = caption_sample(GraphCaptioner(enc, dec, vocab, prep, max_len, context), ds, sample)
        half_caps = caption_sample(
            GraphCaptioner(work / "encoder.onnx", work / "decoder.onnx", vocab, prep, max_len, context), ds, sample)
        parity = caption_parity(ds, float_caps, half_caps, label="float16")
        refusal = verdict(parity, tolerance, label="float16")
        if refusal:
            raise CapcliError(refusal)
        sizes = {"float32": enc.stat().st_size + dec.stat().st_size}
        os.replace(work / "encoder.onnx", enc)
        os.replace(work / "decoder.onnx", dec)
        sizes["float16"] = enc.stat().st_size + dec.stat().st_size
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
