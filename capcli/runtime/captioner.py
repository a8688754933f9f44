"""Captioning images with either runtime: load, preprocess, encode, decode (greedy or beam).

A captioner has `preprocessing`, `vocab`, `max_len`, `step` (the decode step), `grid` (the attention
grid, or None for a pooled decoder) and `start(images) -> (state, context)`: the initial (h0, c0) and
the per-image context an attention decoder reads (empty for a pooled one). Both ONNX Runtime and
PyTorch captioners do. No torch import here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from capcli.decode import Hypothesis, beam_search, constrained_beam_search, greedy, sample
from capcli.guidance import TABLES, ClassWords, GuideOptions, ImageClasses, load_table
from capcli.images import ImageError, InMemoryImage, source_input


class Alternative(NamedTuple):
    """One caption the search found for an image, with its score."""

    caption: str
    score: float


class WordAttention(NamedTuple):
    """A caption word and the attention weights over the grid's H*W cells it was predicted with (they sum to 1)."""

    word: str
    weights: np.ndarray

    def __repr__(self) -> str:
        return f"WordAttention(word={self.word!r}, weights=<{self.weights.size} weights, max {self.weights.max():.3f}>)"


@dataclass
class CaptionResult:
    """One image's caption, as `capcli caption --json`, the server and `capcli.load(...).caption` give it.

    Attributes:
        image: The image's path as given, or `<image N>` for the N-th in-memory image (from 0).
        caption: The best caption; None when the image could not be read (see `error`).
        score: The caption's log-probability per word (0 is certain; higher is likelier). With guidance it
            includes the classifier's bonus and penalties (what the search ranked by), so it is comparable only
            with scores decoded with the same guidance.
        alternatives: With several captions asked for (`n_best` > 1): each (caption, score), best first, the
            best included; empty otherwise.
        error: Why the image could not be captioned (unreadable, too large...), or None.
        attention: For a model with the attention decoder (from the Python API always, from the CLI with
            `--attention`): each word of the caption with the weights over the grid it was predicted with; None
            otherwise.
        grid: The attention grid's (height, width), with `attention`.
        classes: For a model whose encoder returns ImageNet classes, with guidance on: the likeliest classes,
            the words steered to and the words held back; None otherwise.
    """

    image: str
    caption: str | None = None
    score: float | None = None  # length-normalised log-probability
    alternatives: list[Alternative] = field(default_factory=list)
    error: str | None = None
    # With attention maps asked for: each caption word with the weights over the grid [H*W] it was
    # predicted with, and the grid's (height, width).
    attention: list[WordAttention] | None = None
    grid: tuple[int, int] | None = None
    classes: ImageClasses | None = None

    def to_dict(self) -> dict:
        d = {"image": self.image, "caption": self.caption, "score": self.score}
        if self.alternatives:
            d["beams"] = [{"caption": c, "score": s} for c, s in self.alternatives]
        if self.attention is not None and self.grid is not None:
            d["attention"] = {
                "grid": list(self.grid),
                "words": [{"word": w, "alpha": [round(float(a), 5) for a in alpha]} for w, alpha in self.attention],
            }
        if self.classes is not None:
            d["classes"] = self.classes.to_json()
        if self.error:
            d["error"] = self.error
        return d


@dataclass(frozen=True)
class Sampling:
    """Sample words instead of searching: softmax temperature, top-k (0 = all words), seed."""

    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Guards:
    """What keeps captions of photos far from the training data readable; both on by default.

    `suppress_unk`: <unk> is never generated (it is a real training target on Flickr and COCO vocabularies,
    and the likeliest "word" where the model is lost). `no_repeat_ngram` n: no n-gram twice in a caption
    (0: off). Defaults chosen on Flickr8k val, where neither lowers a score (README, "Real photographs").
    """

    suppress_unk: bool = True
    no_repeat_ngram: int = 3

    def never(self, vocab) -> tuple[int, ...]:
        return vocab.not_words + ((vocab.unk_id,) if self.suppress_unk else ())


DEFAULT_GUARDS = Guards()
MAX_BEAM = 16  # the widest beam (and most alternatives) any command or the server decodes with
NO_GUARDS = Guards(suppress_unk=False, no_repeat_ngram=0)


def decode_hypotheses(captioner, state, beam_size: int, n_best: int = 1, max_len: int | None = None,
                      sampling: Sampling | None = None, context=(),
                      guards: Guards = DEFAULT_GUARDS, bias: np.ndarray | None = None,
                      required: np.ndarray | None = None) -> list[list[Hypothesis]]:
    """Initial states (and per-image context) of a batch -> per image, its hypotheses best first; `bias`: the
    classifier's guidance [images, V] (`guidance_bias`); `required` [images]: a word id each beam-searched caption
    must hold (-1: none), by constrained beam search."""
    vocab, max_len = captioner.vocab, max_len or captioner.max_len
    never, ngram = guards.never(vocab), guards.no_repeat_ngram
    if sampling is not None:
        rng = np.random.default_rng(sampling.seed)
        hyps = sample(captioner.step, state, vocab.start_id, vocab.end_id, max_len=max_len,
                      temperature=sampling.temperature, top_k=sampling.top_k, rng=rng, context=context,
                      never=never, no_repeat_ngram=ngram, bias=bias)
        return [[h] for h in hyps]
    if beam_size <= 1:
        hyps = greedy(captioner.step, state, vocab.start_id, vocab.end_id, max_len=max_len, context=context,
                      never=never, no_repeat_ngram=ngram, bias=bias)
        return [[h] for h in hyps]
    def search(rows: np.ndarray | slice, constrained: bool) -> list[list[Hypothesis]]:
        part = (tuple(s[:, rows] for s in state), tuple(c[rows] for c in context))
        options = {"beam_size": beam_size, "max_len": max_len, "n_best": n_best, "context": part[1], "never": never,
                   "no_repeat_ngram": ngram, "bias": bias[rows] if bias is not None else None}
        if constrained:
            return constrained_beam_search(captioner.step, part[0], vocab.start_id, vocab.end_id, required[rows],
                                           **options)
        return beam_search(captioner.step, part[0], vocab.start_id, vocab.end_id, **options)

    if required is None or not (required >= 0).any():
        return search(slice(None), False)  # views, no copies
    images = np.arange(state[0].shape[1])
    # Only the photos with a required word pay for the constrained search (two groups of beams).
    found: list = [None] * len(images)
    for constrained, rows in ((True, images[required >= 0]), (False, images[required < 0])):
        for row, hyps in zip(rows, search(rows, constrained) if len(rows) else [], strict=True):
            found[row] = hyps
    return found


DEFAULT_GUIDANCE = GuideOptions()
NO_GUIDANCE = GuideOptions(enabled=False)


def guidance_bias(captioner, probs: np.ndarray | None, options: GuideOptions = DEFAULT_GUIDANCE):
    """(bias [images, V], per image `ImageClasses`) from the encoder's class probabilities, or (None, None) when
    guidance is off or the model has no classifier (bundles exported before classifiers, pooled decoders)."""
    head = getattr(captioner, "classifier", None)
    if probs is None or head is None or not options.enabled or head["labels"] not in TABLES:
        return None, None
    words = getattr(captioner, "class_words", None)
    if words is None:
        words = captioner.class_words = ClassWords(load_table(head["labels"]), captioner.vocab.itos)
    return words.bias(probs, options)


def decode_states(captioner, state, beam_size: int, n_best: int = 1, max_len: int | None = None,
                  sampling: Sampling | None = None, context=(), attention: bool = False,
                  guards: Guards = DEFAULT_GUARDS, bias: np.ndarray | None = None, required: np.ndarray | None = None):
    """Initial states (and per-image context) of a batch -> per image, a list of (caption, score) best first;
    with `attention` (attention decoders), (caption, score, weights over the grid of each token [T, H*W])."""
    decoded = decode_hypotheses(captioner, state, beam_size, n_best, max_len, sampling, context, guards, bias,
                                required)
    return [[(captioner.vocab.decode(h.tokens), float(h.score), *((h.attention,) if attention else ()))
             for h in per_image] for per_image in decoded]


def start_batch(captioner, images: np.ndarray):
    """(state, context) for a batch; captioners without `start` (pooled only) give their state and no context."""
    if hasattr(captioner, "start"):
        return captioner.start(images)
    return captioner.encode(images), ()


def start_batch_classes(captioner, images: np.ndarray):
    """(state, context, class probabilities or None) for a batch."""
    if hasattr(captioner, "start_with_classes"):
        return captioner.start_with_classes(images)
    return (*start_batch(captioner, images), None)


def word_attention(vocab, hyp: Hypothesis) -> list[WordAttention]:
    """Each generated word with the attention weights it was predicted with."""
    assert hyp.attention is not None
    return [WordAttention(vocab.decode([t]) or vocab.itos[t], alpha)
            for t, alpha in zip(hyp.tokens, hyp.attention, strict=True)]


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
    """Load and encode in chunks of ENCODE_CHUNK; unusable images get their error.

    -> (state, per-image context, encoded rows, class probabilities or None); (None, (), rows, None) when no image
    could be read.
    """
    starts, rows = [], []
    for chunk in _batches(list(enumerate(paths)), ENCODE_CHUNK):
        arrays = []
        for row, path in chunk:
            try:
                arrays.append(source_input(path, captioner.preprocessing))
                rows.append(row)
            except ImageError as exc:
                results[row].error = str(exc)
        if arrays:
            starts.append(start_batch_classes(captioner, np.stack(arrays)))
    if not starts:
        return None, (), rows, None
    axes = captioner.state_batch_axes
    state = tuple(np.concatenate([st[i] for st, _, _ in starts], axis=axis) for i, axis in enumerate(axes))
    context = tuple(np.concatenate([ctx[i] for _, ctx, _ in starts], axis=0) for i in range(len(starts[0][1])))
    probs = np.concatenate([p for _, _, p in starts], axis=0) if starts[0][2] is not None else None
    return state, context, rows, probs


def caption_images(
    captioner,
    paths: Sequence[Path | str | InMemoryImage],
    beam_size: int = 3,
    batch_size: int = 8,
    n_best: int = 1,
    on_result: Callable[[CaptionResult], None] | None = None,
    sampling: Sampling | None = None,
    attention: bool = False,
    guards: Guards = DEFAULT_GUARDS,
    guidance: GuideOptions = DEFAULT_GUIDANCE,
) -> list[CaptionResult]:
    """Caption every image; unusable ones get an error result and the rest go on.

    `batch_size` images are decoded together; they are encoded ENCODE_CHUNK at a time, so memory stays
    bounded however large the batch. attention: keep, per caption word, the attention weights over the
    grid (attention decoders only).
    """
    from capcli.errors import CapcliError

    grid = getattr(captioner, "grid", None)
    if attention and grid is None:
        raise CapcliError("attention maps need a model with the attention decoder; this one is pooled")
    results: list[CaptionResult] = []
    for chunk in _batches(list(paths), batch_size):
        ready = [CaptionResult(str(path)) for path in chunk]
        state, context, rows, probs = _encode_chunks(captioner, chunk, ready)
        if state is not None:
            bias, seen = guidance_bias(captioner, probs, guidance)
            required = np.array([s.required for s in seen]) if seen is not None and guidance.constrain else None
            decoded = decode_hypotheses(captioner, state, beam_size, n_best, sampling=sampling, context=context,
                                        guards=guards, bias=bias, required=required)
            for i, (row, hyps) in enumerate(zip(rows, decoded, strict=True)):
                ready[row].classes = seen[i] if seen is not None else None
                options = [Alternative(captioner.vocab.decode(h.tokens), float(h.score)) for h in hyps]
                ready[row].caption, ready[row].score = options[0]
                ready[row].alternatives = options if n_best > 1 else []
                if attention:
                    ready[row].attention = word_attention(captioner.vocab, hyps[0])
                    ready[row].grid = (grid.height, grid.width)
        for r in ready:
            results.append(r)
            if on_result:
                on_result(r)
    return results


SHIPPED_MODEL = "flickr8k"  # exported/flickr8k: the bundle capcli ships, trained on Flickr8k's photos


def default_model() -> Path:
    """The shipped bundle, for commands given no model: ./exported/flickr8k, else the checkout's own."""
    from capcli.errors import CapcliError

    here = Path("exported") / SHIPPED_MODEL
    checkout = Path(__file__).resolve().parents[2] / "exported" / SHIPPED_MODEL
    for folder in (here, checkout):
        if (folder / "capcli.json").is_file():
            return folder
    raise CapcliError(f"no --model given, and the shipped model is not in {here} or {checkout} (it comes with a "
                      "checkout of capcli); pass --model BUNDLE, e.g. one made by capcli export or capcli demo")


def open_captioner(model: str | Path, runtime: str = "onnx", provider: str = "auto", device: str = "cpu"):
    """A captioner for a bundle (onnx) or a run dir / bundle source checkpoint (torch)."""
    from capcli.errors import CapcliError

    if runtime == "onnx":
        from capcli.runtime.onnx_runtime import OnnxCaptioner

        return OnnxCaptioner(model, provider=provider)
    if runtime == "torch":
        from capcli.devices import resolve_device
        from capcli.runtime.torch_runtime import TorchCaptioner

        return TorchCaptioner(model, device=resolve_device(device))
    raise CapcliError(f"unknown runtime '{runtime}'; use onnx or torch")
