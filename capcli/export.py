"""Export a trained run to a self-contained ONNX bundle, checked against PyTorch before it is written.

Pooled decoder: encoder.onnx: images [B,3,S,S] -> (h0, c0); decoder.onnx: (tokens [B], h, c) ->
(log_probs, h', c'). Attention decoder: encoder.onnx: images -> (grid [B,P,C'], projection [B,P,A],
h0, c0), the per-image part computed once; decoder.onnx: (tokens, h, c, grid, projection) ->
(log_probs, h', c', alpha [B,P]). The graphs are exported with an example batch of 2 (a batch of 1
would silently fix the batch dimension) and every batch dimension is asserted symbolic.
"""

from __future__ import annotations

import datetime as dt
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
from capcli.console import err
from capcli.errors import CapcliError
from capcli.model import DecoderStep, Encoder
from capcli.paths import atomic_write_json

DEFAULT_OPSET = 18
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


def _export(module, args, path: Path, names_in, names_out, batch_axes: dict[str, int], opset: int) -> str:
    """torch.export-based ONNX export with a symbolic batch; the TorchScript exporter if that fails."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    shapes = tuple({batch_axes[n]: batch} for n in names_in)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                input_names=names_in, output_names=names_out, verbose=False,
            )
            program.save(str(path), external_data=False)
        return "torch.export"
    except Exception as exc:  # some graphs only the TorchScript exporter handles
        err.print(f"torch.export-based ONNX export failed ({type(exc).__name__}); using the TorchScript exporter")
        axes = {n: {batch_axes[n]: "batch"} for n in list(names_in) + list(names_out)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(path), dynamo=False, dynamic_axes=axes, opset_version=opset,
                input_names=names_in, output_names=names_out,
            )
        return "torchscript"


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
    names = [n for n in (ds.splits["test"] or ds.images) if ds.image_path(n).is_file()][:count]
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
    steps = torch_step(step_module.decoder), OnnxStep(dec, names.context)
    (state, context), tokens = start_t, np.full(len(batch), vocab.start_id, dtype=np.int64)
    step_diff = 0.0
    for _ in range(max_len):  # same inputs to both, along PyTorch's greedy path
        (lp_t, next_state, alpha_t), (lp_o, _, alpha_o) = (run_step(s, tokens, state, context) for s in steps)
        step_diff = max(step_diff, float(np.abs(lp_t - lp_o).max()))
        if alpha_t is not None:
            step_diff = max(step_diff, float(np.abs(alpha_t - alpha_o).max()))
        tokens, state = lp_t.argmax(1).astype(np.int64), next_state
    caps = [[h.tokens for h in greedy(s, st, vocab.start_id, vocab.end_id, max_len, context=ctx)]
            for s, (st, ctx) in zip(steps, (start_t, start_o), strict=True)]
    return {
        "images": len(batch),
        "encoder_max_abs_diff": enc_diff,
        "step_log_probs_max_abs_diff": step_diff,
        "greedy_captions_equal": caps[0] == caps[1],
        "tolerance": {"encoder": ENCODER_TOL, "step_log_probs": STEP_TOL},
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
    """The attention grid: alpha [B, P] is a height x width map, row-major (position y*width + x)."""
    return {"height": grid.height, "width": grid.width, "positions": grid.positions,
            "backbone_channels": grid.channels, "channels": config["context_dim"]}


def _prepare_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not (out / bundle.MANIFEST).is_file() and any(out.iterdir()):
        raise CapcliError(f"'{out}' exists and is not a capcli bundle; choose another --out")
    if (out / bundle.MANIFEST).is_file() and not force:
        raise CapcliError(f"bundle '{out}' already exists; use --force to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` with the finished folder; the old bundle survives until the new one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export(
    run: str | Path,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    images: list[Path] | None = None,
    force: bool = False,
) -> Path:
    """Write the bundle for a run (its best checkpoint); returns the bundle folder."""
    from capcli.data.text import Vocabulary
    from capcli.images import load_input
    from capcli.registry import get_backbone

    ckpt_path = checkpoint.resolve(run)
    ckpt = checkpoint.load(ckpt_path)
    out = Path(out) if out else Path("exported") / ckpt_path.parent.name
    _prepare_out(out, force)
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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        s = spec.input_size
        example_images = torch.from_numpy(batch[:2])  # batch of 2: keeps the batch dim symbolic
        encoder_axes = names.axes(("images", *names.encoder_out))
        exporter = _export(encoder, (example_images,), tmp / "encoder.onnx", ["images"], list(names.encoder_out),
                           encoder_axes, opset)
        with torch.inference_mode():
            start = dict(zip(names.encoder_out, encoder(example_images), strict=True))
        tokens = torch.full((2,), vocab.start_id, dtype=torch.long)
        step_args = (tokens, *(start[n].clone() for n in ("h0", "c0", *names.context)))
        decoder_axes = names.axes((*names.decoder_in, *names.decoder_out))
        _export(step, step_args, tmp / "decoder.onnx", list(names.decoder_in), list(names.decoder_out),
                decoder_axes, opset)
        _check_graph(tmp / "encoder.onnx", encoder_axes)
        _check_graph(tmp / "decoder.onnx", decoder_axes)
        parity = _parity(tmp, encoder, step, batch, vocab, int(ckpt["max_len"]), names)
        if parity["encoder_max_abs_diff"] > ENCODER_TOL or parity["step_log_probs_max_abs_diff"] > STEP_TOL:
            raise CapcliError(
                f"ONNX graphs disagree with PyTorch (encoder {parity['encoder_max_abs_diff']:.2e}, "
                f"step {parity['step_log_probs_max_abs_diff']:.2e}); bundle not written"
            )
        atomic_write_json(tmp / "vocab.json", vocab.to_json())
        manifest = {
            "format": bundle.FORMAT,
            "format_version": bundle.FORMAT_VERSION,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "backbone": spec.name,
            "weights": ckpt["weights"],
            "feature_dim": decoders.feature_dim(spec, kind),  # per grid position for attention
            "preprocessing": spec.preprocessing.to_dict(),
            "input_size": s,
            "special_tokens": {"pad": vocab.pad_id, "start": vocab.start_id, "end": vocab.end_id,
                               "unk": vocab.unk_id},
            "vocab_size": len(vocab),
            "vocab_sha256": vocab.sha256,
            "max_len": int(ckpt["max_len"]),
            "decoder": ckpt["config"],
            "decoder_kind": kind,
            "files": {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "vocab": "vocab.json"},
            "io": _io(names, s, ckpt["config"], spec.grid if kind == "attention" else None),
            **({"grid": _grid_manifest(spec.grid, ckpt["config"])} if kind == "attention" else {}),
            "opset": opset,
            "exporter": exporter,
            "versions": {name: _pkg_version(name) for name in ("capcli", "torch", "onnx", "onnxruntime")},
            "capcli_version": __version__,
            "dataset": {"spec": ckpt["train_config"]["dataset"], "images": ckpt["train_config"].get("images"),
                        "seed": ckpt["train_config"]["seed"], "fingerprint": ckpt.get("dataset_fingerprint")},
            "parity": parity,
            "source_checkpoint": str(ckpt_path.resolve()),
            "source_checkpoint_sha256": bundle.sha256_file(ckpt_path),
            "sha256": bundle.hash_files(tmp),
        }
        atomic_write_json(tmp / bundle.MANIFEST, manifest)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
