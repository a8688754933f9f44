"""Captioning with ONNX Runtime from a bundle: needs onnxruntime, numpy and Pillow, never torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capcli.backbone import Grid, Preprocessing
from capcli.bundle.manifest import bundle_file, load_vocabulary, read_manifest
from capcli.bundle.schema import (
    GRAPH_MODEL_KEY,
    GRAPH_VOCAB_KEY,
    MANIFEST,
    check_resize,
    classifier,
    context_inputs,
    decoder_kind,
    is_sha256,
    state_inputs,
)
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
    """The shapes the manifest promises: image size S, layers L, hidden size H, vocabulary V, and for an
    attention bundle the context arrays [B, P, C'] and [B, P, A] and the weights alpha [B, P]."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.meta = meta
        self.size = meta["preprocessing"]["input_size"]
        self.layers = meta["decoder"]["num_layers"]
        self.hidden = meta["decoder"]["hidden_dim"]
        self.vocab_size = meta["vocab_size"]
        self.context: dict[str, list] = {}  # context input -> its shape, in the encoder's output order
        self.positions = None
        self.source: tuple[str, str] | None = None  # (graph, source checkpoint sha256) of the first graph checked
        head = classifier(meta)
        self.classes = {head["output"]: [None, head["classes"]]} if head else {}  # after h0, c0
        if decoder_kind(meta) == "attention":
            grid, config = meta["grid"], meta["decoder"]
            self.positions = grid["height"] * grid["width"]
            dims = {"grid": config["context_dim"], "projection": config["attention_dim"]}
            self.context = {n: [None, self.positions, dims[n]] for n in context_inputs(meta)}

    @property
    def state_shape(self) -> list:
        return [self.layers, None, self.hidden]

    def encoder_outputs(self, batch: int | None = None) -> list[list]:
        state = [self.layers, batch, self.hidden]
        return ([[batch, *shape[1:]] for shape in self.context.values()] + [state, state]
                + [[batch, *shape[1:]] for shape in self.classes.values()])

    def check_encoder(self, sess, name: str) -> None:
        self._check_metadata(sess, name)
        self._check_values(name, "input", sess.get_inputs(), {"images": [None, 3, self.size, self.size]})
        self._check_values(name, "output", sess.get_outputs(), self.encoder_outputs())
        # start() takes the initial state and the context from the encoder's outputs by name.
        self._check_names(name, "outputs", sess.get_outputs(),
                          [*self.context, *(f"{s}0" for s in state_inputs(self.meta)), *self.classes])

    def check_decoder(self, sess, name: str) -> None:
        self._check_metadata(sess, name)
        self._check_names(name, "inputs", sess.get_inputs(),
                          ["tokens", *state_inputs(self.meta), *context_inputs(self.meta)])
        state = self.state_shape
        inputs = {"tokens": [None], "h": state, "c": state, **self.context}
        self._check_values(name, "input", sess.get_inputs(), inputs)
        alpha = [[None, self.positions]] if self.context else []
        self._check_values(name, "output", sess.get_outputs(), [[None, self.vocab_size], state, state, *alpha])
        # One step on a batch of one: the shapes a graph declares can be symbolic, what it returns is not.
        zeros = np.zeros((self.layers, 1, self.hidden), np.float32)
        tokens = np.array([self.meta["special_tokens"]["start"]], np.int64)
        context = {n: np.zeros([1, *shape[1:]], np.float32) for n, shape in self.context.items()}
        outputs = _run(sess, name, {"tokens": tokens, "h": zeros, "c": zeros, **context})
        self.check_arrays(name, outputs, [[1, self.vocab_size], [self.layers, 1, self.hidden],
                                          [self.layers, 1, self.hidden], *([[1, self.positions]] if alpha else [])])

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
        # Each graph names the checkpoint it was exported from, and both must name the same one: read from the
        # graphs themselves, so a manifest without source_checkpoint_sha256 does not switch the check off.
        # Every bundle format this capcli reads (2 and 3) stamped it together with the vocabulary's sha256, so a
        # graph without it was not written by such an export: it is refused, not trusted on the manifest's word.
        model = props.get(GRAPH_MODEL_KEY)
        if not is_sha256(model):
            raise GraphMismatch(f"bundle '{self.folder}': {name} names no source checkpoint in its capcli metadata "
                                f"(exported by an older capcli, or altered); export the run again")
        if self.source is None:
            self.source = (name, model)
        elif self.source[1] != model:
            raise GraphMismatch(f"bundle '{self.folder}': {self.source[0]} and {name} were exported from different "
                                f"checkpoints (a half-swapped bundle); export the run again")
        manifest = self.meta.get("source_checkpoint_sha256")
        if manifest is not None and model != manifest:
            raise GraphMismatch(f"bundle '{self.folder}': {name} comes from another checkpoint than {MANIFEST} "
                                f"names (a graph from another model?)")

    def _check_names(self, name: str, kind: str, values, expected: list[str]) -> None:
        """The graph's input or output names are exactly those capcli.json's 'io' implies (in any order)."""
        got = [v.name for v in values]
        if sorted(got) != sorted(expected):
            raise GraphMismatch(f"bundle '{self.folder}': {name} has {kind} {_names(got)}, but {MANIFEST} 'io' "
                                f"implies {_names(expected)}")

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


def _names(names: list[str]) -> str:
    return "[" + ", ".join(repr(n)[:40] for n in names[:12]) + (", ..." if len(names) > 12 else "") + "]"


def _shape(dims: list) -> str:
    return "[" + ", ".join("B" if d is None or isinstance(d, str) else str(d) for d in dims) + "]"


class OnnxStep:
    """The decode step over decoder.onnx: (tokens, h, c) -> (log_probs, h', c').

    With context input names (an attention bundle) it is a ContextStep: the context arrays are fed
    as those inputs and the attention weights come back as the fourth output.
    """

    def __init__(self, session, name: str = "decoder.onnx", context_names: tuple[str, ...] | list[str] = ()):
        self.session = session
        self.name = name
        self.context_names = tuple(context_names)

    def __call__(self, tokens: np.ndarray, state: tuple[np.ndarray, ...], context: tuple[np.ndarray, ...] = ()):
        h, c = state
        feeds = {"tokens": tokens.astype(np.int64), "h": np.ascontiguousarray(h), "c": np.ascontiguousarray(c)}
        if len(context) != len(self.context_names):
            raise ValueError(f"{self.name} takes context {self.context_names}, got {len(context)} arrays")
        feeds.update((name, np.ascontiguousarray(x)) for name, x in zip(self.context_names, context, strict=True))
        outputs = _run(self.session, self.name, feeds)
        if self.context_names:
            return outputs[0], (outputs[1], outputs[2]), outputs[3]
        return outputs[0], (outputs[1], outputs[2])


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
        check_resize(self.meta, str(self.folder / MANIFEST))
        decoder = _session(bundle_file(self.folder, files["decoder"]), providers, explicit)
        checker.check_decoder(decoder, files["decoder"])
        self.kind = decoder_kind(self.meta)
        self.context_names = context_inputs(self.meta)
        self.step = OnnxStep(decoder, files["decoder"], self.context_names)
        self.checker = checker
        self.grid = Grid.from_dict(self.meta["grid"]) if self.kind == "attention" else None
        self.providers = self.encoder.get_providers()
        self.preprocessing = Preprocessing.from_dict(self.meta["preprocessing"])
        self.max_len = int(self.meta["max_len"])
        self.classifier = classifier(self.meta)  # the encoder's class probabilities, if it returns them

    def start(self, images: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Preprocessed images [B,3,S,S] -> (initial state (h0, c0), per-image context)."""
        return self.start_with_classes(images)[:2]

    def start_with_classes(self, images: np.ndarray):
        """As `start`, and the class probabilities [B, classes] of an encoder that has a classifier (else None)."""
        name = self.meta["files"]["encoder"]
        names = [o.name for o in self.encoder.get_outputs()]
        outputs = _run(self.encoder, name, {"images": images.astype(np.float32)})
        self.checker.check_arrays(name, outputs, self.checker.encoder_outputs(len(images)))
        by_name = dict(zip(names, outputs, strict=True))
        probs = by_name[self.classifier["output"]] if self.classifier else None
        return (by_name["h0"], by_name["c0"]), tuple(by_name[n] for n in self.context_names), probs

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """Preprocessed images -> initial state (h0, c0); decoding an attention bundle also needs `start`'s context."""
        return self.start(images)[0]
