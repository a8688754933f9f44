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


# Images per encoder run, whatever --batch-size is: the encoder's activations grow with the batch (a
# batch of 1000 took 17 GB), while decoding a large batch at once costs little and is what makes it fast.
ENCODE_CHUNK = 16


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def find_images(args: list[str]) -> tuple[list[str], list[str]]:
    """Image arguments -> (image paths, one problem line per argument that gave none).

    A file argument is kept exactly as given (even when its name looks like a glob: `[1].jpg`); a folder
    gives its images, sorted; a glob its matches. An empty argument is an error, not the current folder.
    """
    from capcli.errors import CapcliError
    from capcli.images import IMAGE_SUFFIXES, expand_image_args

    found: list[str] = []
    problems: list[str] = []
    for arg in args:
        if not arg.strip():
            raise CapcliError("an image argument is empty (''); name files, folders or globs")
        if Path(arg).is_file() or not (Path(arg).is_dir() or any(ch in arg for ch in "*?[")):
            found.append(arg)  # missing files are reported in order, as a failed image
            continue
        paths, arg_problems = expand_image_args([arg])
        problems.extend(arg_problems)
        if Path(arg).is_dir() and not paths:
            problems.append(f"{arg}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
        found.extend(str(p) for p in paths)
    if not found:
        raise CapcliError(problems[0] if len(problems) == 1 else f"no images to caption: {'; '.join(problems)}")
    return found, problems


def _encode_chunks(captioner, paths: list, results: list[CaptionResult]):
    """Load and encode in chunks of ENCODE_CHUNK; unusable images get their error. -> (state, encoded rows)."""
    states, rows = [], []
    for chunk in _batches(list(enumerate(paths)), ENCODE_CHUNK):
        arrays = []
        for row, path in chunk:
            try:
                arrays.append(load_input(path, captioner.preprocessing))
                rows.append(row)
            except ImageError as exc:
                results[row].error = str(exc)
        if arrays:
            states.append(captioner.encode(np.stack(arrays)))
    if not states:
        return None, rows
    axes = captioner.state_batch_axes
    state = tuple(np.concatenate([s[i] for s in states], axis=axis) for i, axis in enumerate(axes))
    return state, rows


def caption_images(
    captioner,
    paths: list[Path] | list[str],
    beam_size: int = 3,
    batch_size: int = 8,
    n_best: int = 1,
    on_result: Callable[[CaptionResult], None] | None = None,
    sampling: Sampling | None = None,
) -> list[CaptionResult]:
    """Caption every image; unusable ones get an error result and the rest go on.

    `batch_size` images are decoded together; they are encoded ENCODE_CHUNK at a time, so memory stays
    bounded however large the batch.
    """
    results: list[CaptionResult] = []
    for chunk in _batches(list(paths), batch_size):
        ready = [CaptionResult(str(path)) for path in chunk]
        state, rows = _encode_chunks(captioner, chunk, ready)
        if state is not None:
            decoded = decode_states(captioner, state, beam_size, n_best, sampling=sampling)
            for row, options in zip(rows, decoded, strict=True):
                ready[row].caption, ready[row].score = options[0]
                ready[row].alternatives = options if n_best > 1 else []
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
