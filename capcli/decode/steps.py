"""What every search shares: the step interfaces, hypotheses, the words a caption may hold, and stepping only the
rows still searching."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

State = tuple[np.ndarray, ...]  # recurrent state: every array has the batch on axis 1 (h, c: [layers, batch, hidden])
Context = tuple[np.ndarray, ...]  # per-image context: every array has the batch on axis 0 (grid: [batch, P, C])


class Step(Protocol):
    def __call__(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Tokens int64 [N] -> log-probs float32 [N, V] (log-softmax applied) and the new state."""
        ...


class ContextStep(Protocol):
    def __call__(self, tokens: np.ndarray, state: State, context: Context) -> tuple[np.ndarray, State, np.ndarray]:
        """As Step, reading per-image context; also returns the attention weights used, float32 [N, P]."""
        ...


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without <start> and without <end>
    log_prob: float  # sum of the token log-probs, the <end> token included when finished
    score: float  # log_prob / (len(tokens) + finished) ** length_penalty
    finished: bool  # ended with <end>; False when it hit max_len
    # With a context step: the attention weights each token was predicted with, [len(tokens), P].
    attention: np.ndarray | None = field(default=None, compare=False, repr=False)


def run_step(step: Step | ContextStep, tokens: np.ndarray, state: State, context: Context = ()):
    """One step of either kind -> (log_probs, state, attention weights or None)."""
    if not context:
        log_probs, state = step(tokens, state)  # type: ignore[call-arg]
        return log_probs, state, None
    return step(tokens, state, context)  # type: ignore[call-arg]


def make_hypothesis(
    tokens: list[int], log_prob: float, finished: bool, length_penalty: float, attention: np.ndarray | None = None
) -> Hypothesis:
    length = max(len(tokens) + int(finished), 1)
    score = float(log_prob) / length**length_penalty
    return Hypothesis(tokens=tokens, log_prob=float(log_prob), score=score, finished=finished, attention=attention)


def words_only(
    log_probs: np.ndarray, end_id: int, never: tuple[int, ...], length: int,
    paths: np.ndarray | list[list[int]] | None = None, no_repeat_ngram: int = 0,
    bias: np.ndarray | SparseBias | None = None,
) -> np.ndarray:
    """Log-probs without the tokens a caption cannot hold, and without <end> for the first word.

    `never` (the vocabulary's <pad> and <start>, and <unk> when it is suppressed) are never generated:
    the first two were never training targets, so their scores mean nothing and can win on an image far
    from the training data. There a model can also find ending at once likelier per word than any
    caption; an empty answer tells the user nothing, so a caption has at least one word. With
    `no_repeat_ngram` n, a row whose path so far (`paths`, one per row) would repeat one of its n-grams
    cannot take the token that completes it (a model lost on an odd photo loops: "a dog a dog a dog").
    `bias` [rows, V] is added (guidance, `capcli.guidance`): its negative entries always, its positive ones (a
    bonus towards a word) only while the row's path does not hold that word yet.
    """
    banned = list(never) + ([end_id] if length == 1 else [])
    repeats = repeating(paths, no_repeat_ngram) if no_repeat_ngram and paths is not None else []
    if not banned and not repeats and bias is None:
        return log_probs
    log_probs = log_probs.copy()
    bias = sparse_bias(bias)
    if bias is not None and len(bias.cols):
        log_probs[:, bias.cols] += placed_bias(bias, paths)
    log_probs[:, banned] = -np.inf
    for row, tokens in repeats:
        log_probs[row, tokens] = -np.inf
    return log_probs


class SparseBias:
    """A [rows, V] word bias kept as the few columns where any row has one: guidance touches tens of words of a
    vocabulary of thousands, so each step adds [rows, columns] instead of [rows, V]. Built once per search."""

    def __init__(self, bias: np.ndarray):
        self.cols = np.flatnonzero((bias != 0).any(axis=0))
        self.values = np.ascontiguousarray(bias[:, self.cols])
        self.bonus_rows = np.flatnonzero((self.values > 0).any(axis=1))


def sparse_bias(bias: np.ndarray | SparseBias | None) -> SparseBias | None:
    return bias if bias is None or isinstance(bias, SparseBias) else SparseBias(bias)


def placed_bias(bias: SparseBias, paths: np.ndarray | list[list[int]] | None) -> np.ndarray:
    """`bias.values` without the bonus of words each row's path already holds (a caption names a thing once)."""
    rows = bias.bonus_rows  # only the rows with a bonus at all (a few photos of a batch)
    if paths is None or not len(paths) or not len(rows):
        return bias.values
    if isinstance(paths, np.ndarray):  # beam search: [rows, length], one comparison for all of them
        placed = (paths[rows][:, :, None] == bias.cols[None, None, :]).any(axis=1)
    else:
        placed = np.array([[c in set(paths[r]) for c in bias.cols.tolist()] for r in rows], dtype=bool)
    placed &= bias.values[rows] > 0
    if not placed.any():
        return bias.values
    values = bias.values.copy()
    values[rows] = np.where(placed, 0.0, values[rows])
    return values


def repeating(paths: np.ndarray | list[list[int]], n: int) -> list[tuple[int, list[int]]]:
    """(row, tokens that would complete an n-gram the row's path already holds), for rows that have any."""
    found = []
    for row, path in enumerate(paths):
        path = list(path)
        if len(path) < n:
            continue
        prefix = path[len(path) - n + 1 :] if n > 1 else []
        tokens = [path[i + n - 1] for i in range(len(path) - n + 1) if path[i : i + n - 1] == prefix]
        if tokens:
            found.append((row, tokens))
    return found


def batch_size(state: State) -> int:
    return int(state[0].shape[1])


def check_options(max_len: int, **positive: float) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


class LiveRows:
    """Steps only the rows (beams) of images still searching: one that has ended or settled costs nothing more.

    Its rows get zeros for log-probs, state and attention, never read again (its beams are -inf from then on,
    an ended greedy caption is not extended). Context is cut only when the searching set changes (a copy).
    """

    def __init__(self, beam_size: int, context: Context):
        self.k, self.context = beam_size, context
        self.cut: tuple[bytes, np.ndarray, Context] | None = None

    def step(self, step: Step | ContextStep, tokens: np.ndarray, state: State, done: np.ndarray):
        if not done.any():
            return run_step(step, tokens, state, self.context)
        key = done.tobytes()
        if self.cut is None or self.cut[0] != key:
            rows = (np.flatnonzero(~done)[:, None] * self.k + np.arange(self.k)).ravel()
            self.cut = (key, rows, tuple(x[rows] for x in self.context))
        _, rows, context = self.cut
        part_lp, part_state, part_alpha = run_step(step, tokens[rows], tuple(s[:, rows] for s in state), context)
        log_probs = scattered(part_lp, rows, len(tokens), axis=0)
        state = tuple(scattered(part, rows, len(tokens), axis=1) for part in part_state)
        alpha = None if part_alpha is None else scattered(part_alpha, rows, len(tokens), axis=0)
        return log_probs, state, alpha


def scattered(part: np.ndarray, rows: np.ndarray, n: int, axis: int) -> np.ndarray:
    """`part`'s rows placed at `rows` of an array of n rows along `axis`, zeros elsewhere."""
    shape = list(part.shape)
    shape[axis] = n
    full = np.zeros(shape, dtype=part.dtype)
    full[(slice(None),) * axis + (rows,)] = part
    return full


def stacked(weights: list[np.ndarray], context: Context) -> np.ndarray | None:
    if not context:
        return None
    positions = context[0].shape[1]
    return np.stack(weights).astype(np.float32) if weights else np.zeros((0, positions), np.float32)
