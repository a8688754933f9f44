"""One path per image: greedy decoding and sampling."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from capcli.decode.steps import (
    Context,
    ContextStep,
    Hypothesis,
    LiveRows,
    State,
    Step,
    batch_size,
    check_options,
    make_hypothesis,
    sparse_bias,
    stacked,
    words_only,
)

Chooser = Callable[[np.ndarray], np.ndarray]


def _walk(
    step: Step | ContextStep,
    state: State,
    start_id: int,
    end_id: int,
    max_len: int,
    choose: Chooser,
    context: Context = (),
    never: tuple[int, ...] = (),
    no_repeat_ngram: int = 0,
    bias: np.ndarray | None = None,
) -> list[Hypothesis]:
    """Follow one path per row, picking each next token with `choose`, until all rows end or max_len."""
    n = batch_size(state)
    rows = np.arange(n)
    tokens = np.full(n, start_id, dtype=np.int64)
    seqs: list[list[int]] = [[] for _ in range(n)]
    looked: list[list[np.ndarray]] = [[] for _ in range(n)]
    log_prob = np.zeros(n)
    finished = np.zeros(n, dtype=bool)
    live_rows = LiveRows(1, context)
    bias = sparse_bias(bias)
    for length in range(1, max_len + 1):
        log_probs, state, alpha = live_rows.step(step, tokens, state, finished)
        log_probs = words_only(log_probs, end_id, never, length, seqs, no_repeat_ngram, bias)
        tokens = np.asarray(choose(log_probs), dtype=np.int64)
        live = ~finished
        log_prob[live] += log_probs[rows, tokens][live]
        finished |= live & (tokens == end_id)
        for i in np.flatnonzero(live & ~finished):
            seqs[i].append(int(tokens[i]))
            if alpha is not None:
                looked[i].append(alpha[i])
        if finished.all():
            break
    # No length_penalty argument here: the score is the mean log-prob per token (penalty 1).
    return [
        make_hypothesis(seqs[i], log_prob[i], bool(finished[i]), 1.0, stacked(looked[i], context)) for i in range(n)
    ]


def greedy(
    step: Step | ContextStep, state: State, start_id: int, end_id: int, max_len: int = 20, context: Context = (),
    never: tuple[int, ...] = (), no_repeat_ngram: int = 0, bias: np.ndarray | None = None,
) -> list[Hypothesis]:
    """The most likely next token at every step, for each image of the batch; `never`: ids never generated;
    `no_repeat_ngram` n > 0: no n-gram twice in a caption; `bias` [images, V]: guidance added to the log-probs
    (see `words_only`)."""
    check_options(max_len)
    return _walk(step, state, start_id, end_id, max_len, lambda log_probs: log_probs.argmax(axis=1), context, never,
                 no_repeat_ngram, bias)


def sample(
    step: Step | ContextStep,
    state: State,
    start_id: int,
    end_id: int,
    max_len: int = 20,
    temperature: float = 1.0,
    top_k: int = 0,
    rng: np.random.Generator | None = None,
    context: Context = (),
    never: tuple[int, ...] = (),
    no_repeat_ngram: int = 0,
    bias: np.ndarray | None = None,
) -> list[Hypothesis]:
    """Draw each next token from the (tempered, optionally top-k) distribution; log_prob stays the model's."""
    check_options(max_len, temperature=temperature)
    if not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (no limit) or positive, got {top_k}")
    rng = rng if rng is not None else np.random.default_rng()

    def choose(log_probs: np.ndarray) -> np.ndarray:
        # Only finite entries are divided: -inf (a banned token) / a large temperature must stay -inf, not NaN.
        logits = np.where(np.isneginf(log_probs), -np.inf, log_probs.astype(np.float64) / temperature)
        # A stable sort puts the first of tied maxima first, as argmax does: top_k=1 is exactly greedy.
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k] if top_k else None
        if order is not None:
            logits = np.take_along_axis(logits, order, axis=1)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
        pick = np.minimum((cdf < rng.random((len(cdf), 1))).sum(axis=1), cdf.shape[1] - 1)
        return pick if order is None else order[np.arange(len(pick)), pick]

    return _walk(step, state, start_id, end_id, max_len, choose, context, never, no_repeat_ngram, bias)


