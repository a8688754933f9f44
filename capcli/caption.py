"""Captioning images with either runtime: load, preprocess, encode, decode (greedy or beam).

A captioner has `preprocessing`, `vocab`, `max_len`, `step` (the decode Step) and
`encode(images) -> (h0, c0)`; both ONNX Runtime and PyTorch ones do. No torch import here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capcli.decode import beam_search, greedy, sample
from capcli.images import ImageError, load_input


@dataclass
class CaptionResult:
    image: str
    caption: str | None = None
    score: float | None = None  # length-normalised log-probability
    alternatives: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        d = {"image": self.image, "caption": self.caption, "score": self.score}
        if self.alternatives:
            d["beams"] = [{"caption": c, "score": s} for c, s in self.alternatives]
        if self.error:
            d["error"] = self.error
        return d


@dataclass(frozen=True)
class Sampling:
    """Sample words instead of searching: softmax temperature, top-k (0 = all words), seed."""

    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0


def decode_states(captioner, state, beam_size: int, n_best: int = 1, max_len: int | None = None,
                  sampling: Sampling | None = None):
    """Initial states of a batch -> per image, a list of (caption, score) best first."""
    vocab, max_len = captioner.vocab, max_len or captioner.max_len
    if sampling is not None:
        rng = np.random.default_rng(sampling.seed)
        hyps = sample(captioner.step, state, vocab.start_id, vocab.end_id, max_len=max_len,
                      temperature=sampling.temperature, top_k=sampling.top_k, rng=rng)
        return [[(vocab.decode(h.tokens), float(h.score))] for h in hyps]
    if beam_size <= 1:
        hyps = greedy(captioner.step, state, vocab.start_id, vocab.end_id, max_len=max_len)
        return [[(vocab.decode(h.tokens), float(h.score))] for h in hyps]
    beams = beam_search(
        captioner.step, state, vocab.start_id, vocab.end_id, beam_size=beam_size, max_len=max_len, n_best=n_best
    )
    return [[(vocab.decode(h.tokens), float(h.score)) for h in per_image] for per_image in beams]


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def caption_images(
    captioner,
    paths: list[Path],
    beam_size: int = 3,
    batch_size: int = 8,
    n_best: int = 1,
    on_result: Callable[[CaptionResult], None] | None = None,
    sampling: Sampling | None = None,
) -> list[CaptionResult]:
    """Caption every image; unusable ones get an error result and the rest go on."""
    results: list[CaptionResult] = []
    for chunk in _batches(list(paths), batch_size):
        ready, arrays = [], []
        for path in chunk:
            try:
                arrays.append(load_input(path, captioner.preprocessing))
                ready.append(CaptionResult(str(path)))
            except ImageError as exc:
                ready.append(CaptionResult(str(path), error=str(exc)))
        good = [r for r in ready if r.error is None]
        if good:
            state = captioner.encode(np.stack(arrays))
            decoded = decode_states(captioner, state, beam_size, n_best, sampling=sampling)
            for result, options in zip(good, decoded, strict=True):
                result.caption, result.score = options[0]
                result.alternatives = options if n_best > 1 else []
        for r in ready:
            results.append(r)
            if on_result:
                on_result(r)
    return results


def open_captioner(model: str | Path, runtime: str = "onnx", provider: str = "auto", device: str = "cpu"):
    """A captioner for a bundle (onnx) or a run dir / bundle source checkpoint (torch)."""
    from capcli.errors import CapcliError

    if runtime == "onnx":
        from capcli.runtime_onnx import OnnxCaptioner

        return OnnxCaptioner(model, provider=provider)
    if runtime == "torch":
        from capcli.features import resolve_device
        from capcli.runtime_torch import TorchCaptioner

        return TorchCaptioner(model, device=resolve_device(device))
    raise CapcliError(f"unknown runtime '{runtime}'; use onnx or torch")
