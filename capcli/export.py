"""Export a trained run to a self-contained ONNX bundle, checked against PyTorch before it is written.

Pooled decoder: encoder.onnx: images [B,3,S,S] -> (h0, c0); decoder.onnx: (tokens [B], h, c) ->
(log_probs, h', c'). Attention decoder: encoder.onnx: images -> (grid [B,P,C'], projection [B,P,A],
h0, c0), the per-image part computed once; decoder.onnx: (tokens, h, c, grid, projection) ->
(log_probs, h', c', alpha [B,P]). The graphs are exported with an example batch of 2 (a batch of 1
would silently fix the batch dimension) and every batch dimension is asserted symbolic.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from capcli import __version__, bundle, checkpoint, decoders
from capcli.attention import AttentionEncoder, AttentionStep
from capcli.errors import CapcliError
from capcli.model import DecoderStep, Encoder
from capcli.paths import (
    atomic_write_json,
    describe_os_error,
    is_run_folder,
    output_folder,
    same_file_as_any,
    staging_folder,
)

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the torch.export-based exporter's lowest
ENCODER_TOL = 1e-3  # max |h0,c0 (and grid, projection) torch - onnx|
STEP_TOL = 2e-3  # max |log_probs (and alpha) torch - onnx| along a greedy path


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


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _dynamic_dims(model_path: Path) -> dict[str, list]:
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


def _export(module, args, path: Path, names_in, names_out, batch_axes: dict[str, int], opset: int,
            exporter: str) -> tuple[str, str | None]:
    """Export with a symbolic batch; returns (exporter used, why the TorchScript fallback was needed).

    Some graphs only the TorchScript exporter handles: then it is used quietly and the reason is recorded.
    """
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


def _stamp(path: Path, props: dict[str, str]) -> None:
    """Write capcli's metadata into a graph, so a graph from another model is recognised on load."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _check_graph(path: Path, batch_axes: dict[str, int]) -> None:
    import onnx

    onnx.checker.check_model(str(path))
    for name, dims in _dynamic_dims(path).items():
        axis = batch_axes.get(name)
        if axis is not None and not isinstance(dims[axis], str):
            raise CapcliError(f"export of {path.name} fixed the batch dimension of '{name}' to {dims[axis]}")


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
    from capcli.runtime_onnx import OnnxStep
    from capcli.runtime_torch import torch_step

    enc = ort.InferenceSession(str(tmp / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(tmp / "decoder.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        outs_t = dict(zip(names.encoder_out, (x.numpy() for x in encoder(torch.from_numpy(batch))), strict=True))
    outs_o = dict(zip(names.encoder_out, enc.run(list(names.encoder_out), {"images": batch}), strict=True))
    enc_diff = max(float(np.abs(outs_t[n] - outs_o[n]).max()) for n in names.encoder_out)
    start_t, start_o = [((o["h0"], o["c0"]), tuple(o[n] for n in names.context)) for o in (outs_t, outs_o)]
    steps = torch_step(step_module.decoder), OnnxStep(dec, context_names=names.context)
    (state, context), tokens = start_t, np.full(len(batch), vocab.start_id, dtype=np.int64)
    step_diff = 0.0
    for _ in range(max_len):  # same inputs to both, along PyTorch's greedy path
        (lp_t, next_state, alpha_t), (lp_o, _, alpha_o) = (run_step(s, tokens, state, context) for s in steps)
        step_diff = max(step_diff, float(np.abs(lp_t - lp_o).max()))
        if alpha_t is not None:
            step_diff = max(step_diff, float(np.abs(alpha_t - alpha_o).max()))
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


OUTPUT_FILES = ("encoder.onnx", "decoder.onnx", "vocab.json")  # and the manifest, written last


def _prepare_out(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an --out that is a file, read-only, another folder's content or (without --force) a bundle.

    A training run's folder, or one where the bundle's files would replace the export's own inputs, is
    refused even with --force: the run's vocab.json and checkpoints are not export's to replace.
    """
    output_folder(out)
    if not out.exists():
        return
    if is_run_folder(out):
        raise CapcliError(f"--out '{out}' is a training run's folder; export the bundle outside it")
    for name in (*OUTPUT_FILES, bundle.MANIFEST):
        source = same_file_as_any(out / name, inputs)
        if source is not None:
            raise CapcliError(f"--out '{out}' would replace '{out / name}', an input of this export ({source})")
    if (out / bundle.MANIFEST).exists():
        if not force:
            raise CapcliError(f"bundle '{out}' already exists; use --force to replace it")
    elif any(out.iterdir()) and not force:
        raise CapcliError(f"'{out}' exists and is not a capcli bundle; choose another --out, or use --force "
                          "to write the bundle's files into it (other files are kept)")


def _files_of_previous_bundle(out: Path) -> dict[str, str]:
    """Name -> sha256 of what an earlier export wrote in `out`, read leniently (it may be old or broken)."""
    try:
        meta = json.loads((out / bundle.MANIFEST).read_text(encoding="utf-8"))
        hashes = meta.get("sha256", {}) if isinstance(meta, dict) else {}
        return {n: h for n, h in hashes.items() if isinstance(h, str) and bundle.plain_name_problem(n) is None}
    except (OSError, ValueError, AttributeError):
        return {}


def _install(tmp: Path, out: Path) -> None:
    """Move the finished bundle into `out`, one atomic rename per file and the manifest last.

    Only export's own files are replaced: the user's other files in `out` (notes, evaluations) stay.
    Files an earlier export wrote that this one does not (and that nobody changed since) are removed.
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    previous = _files_of_previous_bundle(out)
    new = {p.name for p in tmp.iterdir()}
    for name in sorted(new - {bundle.MANIFEST}):
        os.replace(tmp / name, out / name)
    os.replace(tmp / bundle.MANIFEST, out / bundle.MANIFEST)
    for name, digest in previous.items():
        stale = out / name
        if name not in new and stale.is_file() and not stale.is_symlink() and bundle.sha256_file(stale) == digest:
            stale.unlink()


def _check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise CapcliError(f"--opset must be from {MIN_OPSET} to {newest} (this onnx package), got {opset}")


def export(
    run: str | Path,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    images: list[Path] | None = None,
    force: bool = False,
    exporter: str = "dynamo",
    quantize: str | None = None,
    calibration: int | None = None,
    tolerance=None,
) -> Path:
    """Write the bundle for a run (its best checkpoint); returns the bundle folder.

    quantize='int8': once the float graphs pass parity, they are replaced by int8 ones (capcli.quantize),
    calibrated on `calibration` training images and refused beyond `tolerance` (a quantize.Tolerance).
    """
    from capcli.data.text import Vocabulary
    from capcli.images import load_input
    from capcli.quantize import check_request
    from capcli.registry import get_backbone

    _check_opset(opset)
    check_exporter(exporter)
    check_request(quantize, calibration, tolerance)
    ckpt_path = checkpoint.resolve(run)
    out = Path(out) if out is not None else Path("exported") / ckpt_path.resolve().parent.name
    _prepare_out(out, force, [ckpt_path, *(images or [])])
    ckpt = checkpoint.load(ckpt_path)
    ckpt_sha256 = bundle.sha256_file(ckpt_path)
    spec = get_backbone(ckpt["backbone"])
    kind = decoders.kind_of(ckpt)
    checkpoint.check_matches(ckpt, spec.name, decoders.feature_dim(spec, kind))
    decoder = checkpoint.build_decoder(ckpt)
    names = GRAPHS[kind]
    if kind == "attention":
        encoder = AttentionEncoder(spec.build_grid(ckpt["weights"]), decoder).eval()
        step = AttentionStep(decoder).eval()
    else:
        encoder = Encoder(spec.build(ckpt["weights"]), decoder).eval()
        step = DecoderStep(decoder).eval()
    vocab = Vocabulary.from_json(ckpt["vocab"])

    real = [load_input(p, spec.preprocessing) for p in parity_images(ckpt, images)]
    if len(real) < 2:
        raise CapcliError("the parity check needs at least 2 readable images; pass --images")
    batch = np.stack(real).astype(np.float32)

    tmp = staging_folder(out.parent, out.name)  # beside `out`: renames stay atomic
    try:
        stamp = {bundle.GRAPH_VOCAB_KEY: vocab.sha256, bundle.GRAPH_MODEL_KEY: ckpt_sha256}
        exporters = _write_graphs(tmp, encoder, step, batch, vocab, opset, stamp, exporter, names)
        parity = _parity(tmp, encoder, step, batch, vocab, int(ckpt["max_len"]), names)
        if parity["encoder_max_abs_diff"] > ENCODER_TOL or parity["step_log_probs_max_abs_diff"] > STEP_TOL:
            raise CapcliError(
                f"ONNX graphs disagree with PyTorch (encoder {parity['encoder_max_abs_diff']:.2e}, "
                f"step {parity['step_log_probs_max_abs_diff']:.2e}); bundle not written"
            )
        quantization = None
        if quantize:
            from capcli.quantize import quantize_bundle

            quantization = quantize_bundle(tmp, ckpt, spec.preprocessing, vocab, calibration, tolerance,
                                           mode=quantize)
        atomic_write_json(tmp / "vocab.json", vocab.to_json())
        manifest = _manifest(tmp, ckpt, ckpt_path, ckpt_sha256, spec, vocab, opset, exporters, parity)
        if quantization:
            manifest["quantization"] = quantization
        bundle.validate_manifest(manifest)  # what we write, we can read
        atomic_write_json(tmp / bundle.MANIFEST, manifest)
        _install(tmp, out)
    except OSError as exc:
        raise CapcliError(f"cannot write the bundle '{out}': {describe_os_error(exc)}; "
                          "nothing in it was changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_graphs(tmp: Path, encoder, step, batch: np.ndarray, vocab, opset: int,
                  stamp: dict[str, str], exporter: str, names: GraphNames = GRAPHS["pooled"]) -> dict[str, str]:
    """encoder.onnx and decoder.onnx in `tmp`, checked and stamped; returns how each was exported."""
    example_images = torch.from_numpy(batch[:2])  # batch of 2: keeps the batch dim symbolic
    enc_axes = names.axes(("images", *names.encoder_out))
    dec_axes = names.axes((*names.decoder_in, *names.decoder_out))
    used = {}
    used["encoder"], enc_fallback = _export(encoder, (example_images,), tmp / "encoder.onnx", ["images"],
                                            list(names.encoder_out), enc_axes, opset, exporter)
    with torch.inference_mode():
        start = dict(zip(names.encoder_out, encoder(example_images), strict=True))
    tokens = torch.full((2,), vocab.start_id, dtype=torch.long)
    step_args = (tokens, *(start[n].clone() for n in ("h0", "c0", *names.context)))
    used["decoder"], dec_fallback = _export(step, step_args, tmp / "decoder.onnx", list(names.decoder_in),
                                            list(names.decoder_out), dec_axes, opset, exporter)
    for name, axes in (("encoder.onnx", enc_axes), ("decoder.onnx", dec_axes)):
        _check_graph(tmp / name, axes)
        _stamp(tmp / name, stamp)
    fallbacks = {k: v for k, v in (("encoder", enc_fallback), ("decoder", dec_fallback)) if v}
    return {**used, **({"fallback_reasons": fallbacks} if fallbacks else {})}


def _manifest(tmp: Path, ckpt: dict, ckpt_path: Path, ckpt_sha256: str, spec, vocab, opset: int,
              exporters: dict, parity: dict) -> dict:
    s = spec.input_size
    kind = decoders.kind_of(ckpt)
    grid = spec.grid if kind == "attention" else None
    return {
        "format": bundle.FORMAT,
        "format_version": bundle.FORMAT_VERSION,
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
        "io": _io(GRAPHS[kind], s, ckpt["config"], grid),
        **({"grid": _grid_manifest(grid, ckpt["config"])} if grid is not None else {}),
        "opset": opset,
        "exporter": exporters,
        "versions": {name: _pkg_version(name) for name in ("capcli", "torch", "onnx", "onnxruntime", "onnxscript")},
        "capcli_version": __version__,
        "dataset": {"spec": ckpt["train_config"]["dataset"], "images": ckpt["train_config"].get("images"),
                    "seed": ckpt["train_config"]["seed"], "fingerprint": ckpt.get("dataset_fingerprint")},
        "parity": parity,
        "source_checkpoint": str(ckpt_path.resolve()),
        "source_checkpoint_sha256": ckpt_sha256,
        "sha256": bundle.hash_files(tmp),
    }


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


def _grid_manifest(grid, config: dict) -> dict:
    """The attention grid: alpha [B, P] is a height x width map, row-major (position y * width + x)."""
    return {"height": grid.height, "width": grid.width, "positions": grid.positions,
            "backbone_channels": grid.channels, "channels": config["context_dim"]}
