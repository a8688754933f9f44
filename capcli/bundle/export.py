"""A trained run's checkpoint becomes a float bundle in a folder: the graphs, checked against PyTorch, its
vocabulary and its manifest (`capcli.bundle.build` stages the folder and puts it in place).

Pooled decoder: encoder.onnx: images [B,3,S,S] -> (h0, c0); decoder.onnx: (tokens [B], h, c) ->
(log_probs, h', c'). Attention decoder: encoder.onnx: images -> (grid [B,P,C'], projection [B,P,A],
h0, c0), the per-image part computed once; decoder.onnx: (tokens, h, c, grid, projection) ->
(log_probs, h', c', alpha [B,P]). When the backbone declares a classifier (`capcli.backbone.Classifier`), an
attention encoder also returns classes [B, K], the class probabilities computed in the same pass, which guide
decoding (`capcli.guidance`). The graphs are exported with an example batch of 2 (a batch of 1
would silently fix the batch dimension) and every batch dimension is asserted symbolic.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from capcli import __version__
from capcli.bundle import manifest, schema
from capcli.errors import CapcliError
from capcli.model import checkpoint, decoders
from capcli.model.attention import AttentionEncoder, AttentionStep
from capcli.model.finetune import grid_extractor
from capcli.model.pooled import DecoderStep, Encoder
from capcli.onnx_graphs import check_graph, stamp_graph, write_graph
from capcli.paths import atomic_write_json

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the torch.export-based exporter's lowest
ENCODER_TOL = 1e-3  # max |h0,c0 (and grid, projection) torch - onnx|
STEP_TOL = 2e-3  # max |log_probs (and alpha) torch - onnx| along a greedy path
CLASSES = "classes"  # the encoder output of class probabilities


@dataclass(frozen=True)
class GraphNames:
    """The two graphs' input/output names for one decoder kind, and each name's batch axis."""

    encoder_out: tuple[str, ...]
    decoder_in: tuple[str, ...]
    decoder_out: tuple[str, ...]
    context: tuple[str, ...] = ()  # decoder inputs that are per-image context, fed from same-named encoder outputs
    batch_axes: dict[str, int] = field(default_factory=dict)

    def axes(self, names) -> dict[str, int]:
        return {n: self.batch_axes[n] for n in names}


_STATE_AXES = {"images": 0, "h0": 1, "c0": 1, "tokens": 0, "h": 1, "c": 1, "log_probs": 0, "h_out": 1, "c_out": 1}
GRAPHS = {
    "pooled": GraphNames(("h0", "c0"), ("tokens", "h", "c"), ("log_probs", "h_out", "c_out"), (), _STATE_AXES),
    "attention": GraphNames(
        ("grid", "projection", "h0", "c0"),
        ("tokens", "h", "c", "grid", "projection"),
        ("log_probs", "h_out", "c_out", "alpha"),
        ("grid", "projection"),
        _STATE_AXES | {"grid": 0, "projection": 0, "alpha": 0},
    ),
}


def parity_images(ckpt: dict, images: list[Path] | None, count: int = 4) -> list[Path]:
    """Real images for the parity check: the given ones, or a few from the run's test split."""
    if images:
        return images
    from capcli.data.readers import load_dataset

    tc = ckpt["train_config"]
    try:
        ds = load_dataset(tc["dataset"], images=tc.get("images"), seed=tc.get("seed", 0))
    except CapcliError as exc:
        raise CapcliError(f"cannot find the run's dataset for the parity check ({exc}); pass --images") from None
    # The test split first; a dataset whose test photos are held back (kept for scoring elsewhere) has val's.
    candidates = [*ds.splits.get("test", []), *ds.splits.get("val", []), *ds.images]
    names = list(dict.fromkeys(n for n in candidates if ds.image_path(n).is_file()))[:count]
    return [ds.image_path(n) for n in names]


def _parity(tmp: Path, encoder, step_module, batch: np.ndarray, vocab, max_len: int, names: GraphNames) -> dict:
    """Compare ONNX Runtime with PyTorch on real inputs: encoder outputs, step outputs, greedy captions."""
    import onnxruntime as ort

    from capcli.decode import greedy, run_step
    from capcli.model.steps import torch_step
    from capcli.runtime.onnx_runtime import OnnxStep

    enc = ort.InferenceSession(str(tmp / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(tmp / "decoder.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        outs_t = dict(zip(names.encoder_out, (x.numpy() for x in encoder(torch.from_numpy(batch))), strict=True))
    outs_o = dict(zip(names.encoder_out, enc.run(list(names.encoder_out), {"images": batch}), strict=True))
    enc_diff = max(_max_diff(outs_t[n], outs_o[n]) for n in names.encoder_out)
    start_t, start_o = [((o["h0"], o["c0"]), tuple(o[n] for n in names.context)) for o in (outs_t, outs_o)]
    steps = torch_step(step_module.decoder), OnnxStep(dec, context_names=names.context)
    (state, context), tokens = start_t, np.full(len(batch), vocab.start_id, dtype=np.int64)
    step_diff = 0.0
    for _ in range(max_len):  # same inputs to both, along PyTorch's greedy path
        (lp_t, next_state, alpha_t), (lp_o, _, alpha_o) = (run_step(s, tokens, state, context) for s in steps)
        step_diff = max(step_diff, _max_diff(lp_t, lp_o))
        if alpha_t is not None:
            step_diff = max(step_diff, _max_diff(alpha_t, alpha_o))
        tokens, state = lp_t.argmax(1).astype(np.int64), next_state
    caps = [[h.tokens for h in greedy(s, st, vocab.start_id, vocab.end_id, max_len, context=ctx, never=vocab.not_words)]
            for s, (st, ctx) in zip(steps, (start_t, start_o), strict=True)]
    return {
        "images": len(batch),
        "encoder_max_abs_diff": enc_diff,
        "step_log_probs_max_abs_diff": step_diff,
        "greedy_captions_equal": caps[0] == caps[1],
        "tolerance": {"encoder": ENCODER_TOL, "step_log_probs": STEP_TOL},
    }


def _max_diff(torch_out: np.ndarray, onnx_out: np.ndarray) -> float:
    """max |torch - onnx|; inf when either holds a NaN or an infinity (a model with such weights is no model to
    ship, and NaN compares false with every tolerance, so it must never reach the comparison)."""
    if not (np.isfinite(torch_out).all() and np.isfinite(onnx_out).all()):
        return math.inf
    return float(np.abs(torch_out - onnx_out).max())


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise CapcliError(f"--opset must be from {MIN_OPSET} to {newest} (this onnx package), got {opset}")


def write_bundle(ckpt_path: Path, folder: Path, opset: int = DEFAULT_OPSET, images: list[Path] | None = None,
                 exporter: str = "dynamo") -> dict:
    """Write the float bundle of a checkpoint into `folder` (empty; the caller installs it); returns its manifest.

    Raises CapcliError when the ONNX graphs disagree with PyTorch on real images beyond ENCODER_TOL / STEP_TOL.
    """
    from capcli.data.text import Vocabulary
    from capcli.images import load_input
    from capcli.registry import get_backbone

    ckpt = checkpoint.load(ckpt_path)
    ckpt_sha256 = manifest.sha256_file(ckpt_path)
    spec = get_backbone(ckpt["backbone"])
    # Photos are framed as the run's features were (its resize mode; checkpoints from before modes: crop).
    spec = spec.with_resize_mode(ckpt.get("preprocessing", {}).get("resize_mode", "crop"))
    schema.check_preprocessing(spec.preprocessing.to_dict(), f"backbone '{spec.name}' cannot be exported")
    kind = decoders.kind_of(ckpt)
    checkpoint.check_matches(ckpt, spec.name, decoders.feature_dim(spec, kind))
    decoder = checkpoint.build_decoder(ckpt)
    names = GRAPHS[kind]
    if kind == "attention":
        classes = spec.classifier is not None
        names = with_classes(names) if classes else names
        encoder = AttentionEncoder(grid_extractor(spec, ckpt, classes=classes), decoder).eval()
        step = AttentionStep(decoder).eval()
    else:
        encoder = Encoder(spec.build(ckpt["weights"]), decoder).eval()
        step = DecoderStep(decoder).eval()
    vocab = Vocabulary.from_json(ckpt["vocab"])

    real = [load_input(p, spec.preprocessing) for p in parity_images(ckpt, images)]
    if len(real) < 2:
        raise CapcliError("the parity check needs at least 2 readable images; pass --images")
    batch = np.stack(real).astype(np.float32)

    stamp = {schema.GRAPH_VOCAB_KEY: vocab.sha256, schema.GRAPH_MODEL_KEY: ckpt_sha256}
    exporters = _write_graphs(folder, encoder, step, batch, vocab, opset, stamp, exporter, names)
    parity = _parity(folder, encoder, step, batch, vocab, int(ckpt["max_len"]), names)
    if math.inf in (parity["encoder_max_abs_diff"], parity["step_log_probs_max_abs_diff"]):
        raise CapcliError(f"the model's outputs are not finite (NaN or infinite weights in {ckpt_path}?); "
                          "bundle not written")
    if parity["encoder_max_abs_diff"] > ENCODER_TOL or parity["step_log_probs_max_abs_diff"] > STEP_TOL:
        raise CapcliError(
            f"ONNX graphs disagree with PyTorch (encoder {parity['encoder_max_abs_diff']:.2e}, "
            f"step {parity['step_log_probs_max_abs_diff']:.2e}); bundle not written"
        )
    atomic_write_json(folder / "vocab.json", vocab.to_json())
    meta = _manifest(folder, ckpt, ckpt_path, ckpt_sha256, spec, vocab, opset, exporters, parity, names)
    manifest.validate_manifest(meta)  # what we write, we can read
    atomic_write_json(folder / manifest.MANIFEST, manifest.sealed(meta))
    return meta


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _write_graphs(tmp: Path, encoder, step, batch: np.ndarray, vocab, opset: int,
                  stamp: dict[str, str], exporter: str, names: GraphNames = GRAPHS["pooled"]) -> dict[str, str]:
    """encoder.onnx and decoder.onnx in `tmp`, checked and stamped; returns how each was exported."""
    example_images = torch.from_numpy(batch[:2])  # batch of 2: keeps the batch dim symbolic
    enc_axes = names.axes(("images", *names.encoder_out))
    dec_axes = names.axes((*names.decoder_in, *names.decoder_out))
    used = {}
    used["encoder"], enc_fallback = write_graph(encoder, (example_images,), tmp / "encoder.onnx", ["images"],
                                            list(names.encoder_out), enc_axes, opset, exporter)
    with torch.inference_mode():
        start = dict(zip(names.encoder_out, encoder(example_images), strict=True))
    tokens = torch.full((2,), vocab.start_id, dtype=torch.long)
    step_args = (tokens, *(start[n].clone() for n in ("h0", "c0", *names.context)))
    used["decoder"], dec_fallback = write_graph(step, step_args, tmp / "decoder.onnx", list(names.decoder_in),
                                            list(names.decoder_out), dec_axes, opset, exporter)
    for name, axes in (("encoder.onnx", enc_axes), ("decoder.onnx", dec_axes)):
        check_graph(tmp / name, axes)
        stamp_graph(tmp / name, stamp)
    fallbacks = {k: v for k, v in (("encoder", enc_fallback), ("decoder", dec_fallback)) if v}
    return {**used, **({"fallback_reasons": fallbacks} if fallbacks else {})}


def _manifest(tmp: Path, ckpt: dict, ckpt_path: Path, ckpt_sha256: str, spec, vocab, opset: int,
              exporters: dict, parity: dict, names: GraphNames) -> dict:
    s = spec.input_size
    kind = decoders.kind_of(ckpt)
    grid = spec.grid if kind == "attention" else None
    return {
        "format": schema.FORMAT,
        "format_version": schema.FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "backbone": spec.name,
        "weights": ckpt["weights"],
        "feature_dim": decoders.feature_dim(spec, kind),  # per grid position for attention
        "preprocessing": spec.preprocessing.to_dict(),
        "input_size": s,
        "special_tokens": {"pad": vocab.pad_id, "start": vocab.start_id, "end": vocab.end_id, "unk": vocab.unk_id},
        "vocab_size": len(vocab),
        "vocab_sha256": vocab.sha256,
        "max_len": int(ckpt["max_len"]),
        "decoder": ckpt["config"],
        "decoder_kind": kind,
        "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "vocab": "vocab.json"},
        "io": _io(names, s, ckpt["config"], grid),
        **({"grid": _grid_manifest(grid, ckpt["config"])} if grid is not None else {}),
        **({"classifier": _classifier_manifest(spec, ckpt)} if CLASSES in names.encoder_out else {}),
        **({"finetuned": {"split": ckpt["tail"]["split"]}} if ckpt.get("tail") else {}),
        "opset": opset,
        "exporter": exporters,
        "versions": {name: _pkg_version(name) for name in ("capcli", "torch", "onnx", "onnxruntime", "onnxscript")},
        "capcli_version": __version__,
        "dataset": {"spec": ckpt["train_config"]["dataset"], "images": ckpt["train_config"].get("images"),
                    "seed": ckpt["train_config"]["seed"], "fingerprint": ckpt.get("dataset_fingerprint")},
        "training": _training(ckpt),
        "parity": parity,
        "source_checkpoint": str(ckpt_path.resolve()),
        "source_checkpoint_sha256": ckpt_sha256,
        "sha256": manifest.hash_files(tmp),
    }


def _training(ckpt: dict) -> dict:
    """capcli.json's record of how the exported weights were trained: the stage (cross-entropy, or scst after
    `capcli scst`), and for each stage the epoch the weights are from, the epochs asked for and that epoch's
    validation scores (greedy captions; the loss for cross-entropy)."""
    tc, history = ckpt.get("train_config", {}), ckpt.get("history") or []
    row = next((h for h in reversed(history) if h.get("best")), {})  # best.pt's epoch: the last one marked best
    xe = {"epoch": row.get("epoch", ckpt["epoch"] + 1 if "epoch" in ckpt else None), "epochs": tc.get("epochs"),
          "select_on": tc.get("select_on"), "val": _scores(row, ("loss", "bleu4", "cider"))}
    training = {"stage": "scst" if ckpt.get("stage") == "scst" else "cross-entropy", "cross_entropy": xe}
    if training["stage"] == "scst":
        scst, config = ckpt.get("scst", {}), ckpt.get("scst", {}).get("config", {})
        training["scst"] = {"epoch": scst.get("epoch"), **{k: config.get(k) for k in ("epochs", "baseline",
                            "samples", "lr")}, "val": _scores(scst, ("bleu4", "cider", "distinct", "words"))}
    return _without_none(training)


def _scores(row: dict, names: tuple[str, ...]) -> dict:
    return {n: round(float(row[f"val_{n}"]), 4) for n in names if isinstance(row.get(f"val_{n}"), int | float)}


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _io(names: GraphNames, size: int, config: dict, grid) -> dict:
    """capcli.json's description of the graphs' inputs and outputs (shapes, recurrent state, context)."""
    recurrent = ["layers", "batch", "hidden"]
    inputs: dict[str, list] = {"tokens": ["batch"], "h": recurrent, "c": recurrent}
    if grid is not None:
        inputs |= {"grid": ["batch", grid.positions, config["context_dim"]],
                   "projection": ["batch", grid.positions, config["attention_dim"]]}
    return {
        "encoder": {"inputs": {"images": ["batch", 3, size, size]}, "outputs": list(names.encoder_out)},
        "decoder": {"inputs": inputs, "outputs": list(names.decoder_out)},
        "state": ["h", "c"],  # recurrent: from the encoder's h0/c0, then from the step's h_out/c_out
        "context": list(names.context),  # per image: the encoder's outputs of the same names, at every step
    }


def with_classes(names: GraphNames) -> GraphNames:
    """The graph names of an encoder that also returns class probabilities."""
    return replace(names, encoder_out=(*names.encoder_out, CLASSES), batch_axes={**names.batch_axes, CLASSES: 0})


def _classifier_manifest(spec, ckpt: dict) -> dict:
    """The encoder's class probabilities: which label set, how many, and which grid the head reads."""
    head = spec.classifier
    reads = "the untouched tail's grid (the tail was fine-tuned)" if ckpt.get("tail") else "the grid"
    return {"labels": head.labels, "classes": head.classes, "output": CLASSES, "reads": reads}


def _grid_manifest(grid, config: dict) -> dict:
    """The attention grid: alpha [B, P] is a height x width map, row-major (position y * width + x)."""
    return {"height": grid.height, "width": grid.width, "positions": grid.positions,
            "backbone_channels": grid.channels, "channels": config["context_dim"]}
