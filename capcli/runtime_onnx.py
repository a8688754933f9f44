"""Captioning with ONNX Runtime from a bundle: needs onnxruntime, numpy and Pillow, never torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from capcli.backbone import Preprocessing
from capcli.bundle import read_manifest
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
    """The decode Step interface over decoder.onnx."""

    def __init__(self, session):
        self.session = session

    def __call__(self, tokens: np.ndarray, state: tuple[np.ndarray, ...]):
        h, c = state
        log_probs, h, c = self.session.run(
            None, {"tokens": tokens.astype(np.int64), "h": np.ascontiguousarray(h), "c": np.ascontiguousarray(c)}
        )
        return log_probs, (h, c)


class OnnxCaptioner:
    runtime = "onnx"

    def __init__(self, bundle: str | Path, provider: str = "auto"):
        from capcli.data.text import Vocabulary

        self.folder = Path(bundle)
        self.meta = read_manifest(self.folder)
        providers = choose_providers(provider)
        explicit = provider == "cuda"
        self.encoder = _session(self.folder / self.meta["files"]["encoder"], providers, explicit)
        self.step = OnnxStep(_session(self.folder / self.meta["files"]["decoder"], providers, explicit))
        self.providers = self.encoder.get_providers()
        vocab_path = self.folder / self.meta["files"]["vocab"]
        self.vocab = Vocabulary.from_json(json.loads(vocab_path.read_text()))
        self.preprocessing = Preprocessing.from_dict(self.meta["preprocessing"])
        self.max_len = int(self.meta["max_len"])

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, c = self.encoder.run(None, {"images": images.astype(np.float32)})
        return h, c
