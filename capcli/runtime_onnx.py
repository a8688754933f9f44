"""Captioning with ONNX Runtime from a bundle: needs onnxruntime, numpy and Pillow, never torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from capcli.backbone import Grid, Preprocessing
from capcli.bundle import context_inputs, decoder_kind, read_manifest
from capcli.errors import CapcliError
from capcli.providers import choose_providers


def _session(path: Path, providers: list[str], explicit_cuda: bool):
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise CapcliError(f"cannot load {path.name}: {str(exc).splitlines()[0][:200]}") from None
    if explicit_cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime silently falls back to CPU when CUDA fails to initialise; we do not.
        raise CapcliError(f"--provider cuda asked for, but {path.name} fell back to {sess.get_providers()[0]}")
    return sess


class OnnxStep:
    """The decode step over decoder.onnx: (tokens, h, c) -> (log_probs, h', c').

    With context input names (an attention bundle) it is a ContextStep: the context arrays are fed
    as those inputs and the attention weights come back as the fourth output.
    """

    def __init__(self, session, context_names: tuple[str, ...] | list[str] = ()):
        self.session = session
        self.context_names = tuple(context_names)

    def __call__(self, tokens: np.ndarray, state: tuple[np.ndarray, ...], context: tuple[np.ndarray, ...] = ()):
        h, c = state
        feeds = {"tokens": tokens.astype(np.int64), "h": np.ascontiguousarray(h), "c": np.ascontiguousarray(c)}
        if len(context) != len(self.context_names):
            raise ValueError(f"decoder.onnx takes context {self.context_names}, got {len(context)} arrays")
        feeds.update((name, np.ascontiguousarray(x)) for name, x in zip(self.context_names, context, strict=True))
        outputs = self.session.run(None, feeds)
        if self.context_names:
            return outputs[0], (outputs[1], outputs[2]), outputs[3]
        return outputs[0], (outputs[1], outputs[2])


class OnnxCaptioner:
    runtime = "onnx"

    def __init__(self, bundle: str | Path, provider: str = "auto"):
        from capcli.data.text import Vocabulary

        self.folder = Path(bundle)
        self.meta = read_manifest(self.folder)
        providers = choose_providers(provider)
        explicit = provider == "cuda"
        self.encoder = _session(self.folder / self.meta["files"]["encoder"], providers, explicit)
        self.kind = decoder_kind(self.meta)
        self.context_names = context_inputs(self.meta)
        self.step = OnnxStep(_session(self.folder / self.meta["files"]["decoder"], providers, explicit),
                             self.context_names)
        self.grid = Grid.from_dict(self.meta["grid"]) if self.kind == "attention" else None
        self.providers = self.encoder.get_providers()
        vocab_path = self.folder / self.meta["files"]["vocab"]
        self.vocab = Vocabulary.from_json(json.loads(vocab_path.read_text()))
        self.preprocessing = Preprocessing.from_dict(self.meta["preprocessing"])
        self.max_len = int(self.meta["max_len"])

    def start(self, images: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Preprocessed images [B,3,S,S] -> (initial state (h0, c0), per-image context)."""
        names = [o.name for o in self.encoder.get_outputs()]
        outputs = dict(zip(names, self.encoder.run(None, {"images": images.astype(np.float32)}), strict=True))
        return (outputs["h0"], outputs["c0"]), tuple(outputs[name] for name in self.context_names)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """Preprocessed images -> initial state (h0, c0); decoding an attention bundle also needs `start`'s context."""
        return self.start(images)[0]
