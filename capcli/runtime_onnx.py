"""Captioning with ONNX Runtime from a bundle: needs onnxruntime, numpy and Pillow, never torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capcli.backbone import Preprocessing
from capcli.bundle import GRAPH_MODEL_KEY, GRAPH_VOCAB_KEY, MANIFEST, bundle_file, load_vocabulary, read_manifest
from capcli.errors import CapcliError
from capcli.providers import choose_providers


def _session(path: Path, providers: list[str], explicit_cuda: bool):
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise CapcliError(f"cannot load {path.name}: {_first_line(exc)}") from None
    if explicit_cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime silently falls back to CPU when CUDA fails to initialise; we do not.
        raise CapcliError(f"--provider cuda asked for, but {path.name} fell back to {sess.get_providers()[0]}")
    return sess


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _run(session, name: str, feeds: dict) -> list[np.ndarray]:
    """session.run with onnxruntime's failures (shapes, memory) as one clear line."""
    try:
        return session.run(None, feeds)
    except Exception as exc:
        raise CapcliError(f"{name} failed in onnxruntime: {_first_line(exc)}") from None


class GraphMismatch(CapcliError):
    """A graph whose inputs or outputs do not fit the bundle's manifest (a file from another model)."""


class GraphChecker:
    """The shapes the manifest promises: image size S, layers L, hidden size H, vocabulary V."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.size = meta["preprocessing"]["input_size"]
        self.layers = meta["decoder"]["num_layers"]
        self.hidden = meta["decoder"]["hidden_dim"]
        self.vocab_size = meta["vocab_size"]

    @property
    def state_shape(self) -> list:
        return [self.layers, None, self.hidden]

    def check_encoder(self, sess, name: str) -> None:
        self._check_metadata(sess, name)
        self._check_values(name, "input", sess.get_inputs(), {"images": [None, 3, self.size, self.size]})
        self._check_values(name, "output", sess.get_outputs(), [self.state_shape, self.state_shape])

    def check_decoder(self, sess, name: str) -> None:
        self._check_metadata(sess, name)
        state = self.state_shape
        self._check_values(name, "input", sess.get_inputs(), {"tokens": [None], "h": state, "c": state})
        self._check_values(name, "output", sess.get_outputs(), [[None, self.vocab_size], state, state])
        # One step on a batch of one: the shapes a graph declares can be symbolic, what it returns is not.
        zeros = np.zeros((self.layers, 1, self.hidden), np.float32)
        tokens = np.array([self.meta["special_tokens"]["start"]], np.int64)
        outputs = _run(sess, name, {"tokens": tokens, "h": zeros, "c": zeros})
        self.check_arrays(name, outputs, [[1, self.vocab_size], [self.layers, 1, self.hidden],
                                          [self.layers, 1, self.hidden]])

    def check_arrays(self, name: str, arrays: list[np.ndarray], expected: list[list]) -> None:
        for i, (array, want) in enumerate(zip(arrays, expected, strict=True)):
            self._compare(name, f"output {i}", list(array.shape), want)

    def _check_metadata(self, sess, name: str) -> None:
        props = sess.get_modelmeta().custom_metadata_map
        if GRAPH_VOCAB_KEY not in props:
            raise GraphMismatch(f"bundle '{self.folder}': {name} was not exported with this bundle "
                                f"(it carries no capcli metadata); export the run again")
        if props[GRAPH_VOCAB_KEY] != self.meta["vocab_sha256"]:
            raise GraphMismatch(f"bundle '{self.folder}': {name} was exported with another vocabulary "
                                f"than {MANIFEST} names (a graph from another model?)")
        model = self.meta.get("source_checkpoint_sha256")
        if model is not None and props.get(GRAPH_MODEL_KEY) != model:
            raise GraphMismatch(f"bundle '{self.folder}': {name} comes from another checkpoint than {MANIFEST} "
                                f"names (a graph from another model?)")

    def _check_values(self, name: str, kind: str, values, expected: dict | list) -> None:
        if len(values) != len(expected):
            raise GraphMismatch(f"bundle '{self.folder}': {name} has {len(values)} {kind}s, expected {len(expected)}")
        if isinstance(expected, dict):
            by_name = {v.name: v for v in values}
            for key, want in expected.items():
                if key not in by_name:
                    raise GraphMismatch(f"bundle '{self.folder}': {name} has no {kind} '{key}'")
                self._compare(name, f"{kind} '{key}'", by_name[key].shape, want)
        else:
            for value, want in zip(values, expected, strict=True):
                self._compare(name, f"{kind} '{value.name}'", value.shape, want)

    def _compare(self, name: str, what: str, shape, want: list) -> None:
        """Declared dims that are numbers must equal the manifest's; symbolic ones (None, 'batch') pass."""
        shape = list(shape or [])
        if len(shape) != len(want):
            raise GraphMismatch(f"bundle '{self.folder}': {name} {what} has {len(shape)} dimensions, "
                                f"expected {len(want)}")
        for got, exp in zip(shape, want, strict=True):
            if exp is not None and isinstance(got, int) and got != exp:
                raise GraphMismatch(
                    f"bundle '{self.folder}': {name} {what} has shape {_shape(shape)}, but {MANIFEST} implies "
                    f"{_shape(want)} (image size {self.size}, layers {self.layers}, hidden {self.hidden}, "
                    f"vocabulary {self.vocab_size}); a graph from another model?"
                )


def _shape(dims: list) -> str:
    return "[" + ", ".join("B" if d is None or isinstance(d, str) else str(d) for d in dims) + "]"


class OnnxStep:
    """The decode Step interface over decoder.onnx."""

    def __init__(self, session, name: str = "decoder.onnx"):
        self.session = session
        self.name = name

    def __call__(self, tokens: np.ndarray, state: tuple[np.ndarray, ...]):
        h, c = state
        log_probs, h, c = _run(self.session, self.name, {
            "tokens": tokens.astype(np.int64), "h": np.ascontiguousarray(h), "c": np.ascontiguousarray(c)
        })
        return log_probs, (h, c)


class OnnxCaptioner:
    """A bundle opened for captioning: manifest, files and graph shapes all checked before any image."""

    runtime = "onnx"
    state_batch_axes = (1, 1)  # h and c are [layers, batch, hidden]

    def __init__(self, bundle: str | Path, provider: str = "auto"):
        self.folder = Path(bundle)
        self.meta = read_manifest(self.folder)
        self.vocab = load_vocabulary(self.folder, self.meta)
        providers = choose_providers(provider)
        explicit = provider == "cuda"
        checker = GraphChecker(self.folder, self.meta)
        files = self.meta["files"]
        self.encoder = _session(bundle_file(self.folder, files["encoder"]), providers, explicit)
        checker.check_encoder(self.encoder, files["encoder"])
        decoder = _session(bundle_file(self.folder, files["decoder"]), providers, explicit)
        checker.check_decoder(decoder, files["decoder"])
        self.step = OnnxStep(decoder, files["decoder"])
        self.checker = checker
        self.providers = self.encoder.get_providers()
        self.preprocessing = Preprocessing.from_dict(self.meta["preprocessing"])
        self.max_len = int(self.meta["max_len"])

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        name = self.meta["files"]["encoder"]
        h, c = _run(self.encoder, name, {"images": images.astype(np.float32)})
        state = [self.checker.layers, len(images), self.checker.hidden]
        self.checker.check_arrays(name, [h, c], [state, state])
        return h, c
