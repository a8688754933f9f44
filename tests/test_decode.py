"""Decoding against fake numpy steps whose probabilities are known exactly."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from capcli.decode import Hypothesis, State, beam_search, greedy, sample

START = 99  # fed, never produced: the fakes only need it to be an int

Dist = Callable[[int, tuple[int, ...]], np.ndarray]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


class OracleStep:
    """Log-probs are a function of (image, generated prefix); the state is the token history.

    State row 0 holds the image id, row 1 <start>, further rows the fed tokens, batch on axis 1, so the
    decoder's repeat and reorder of the state are what keep each row's history right.
    """

    def __init__(self, dist: Dist):
        self.dist = dist
        self.calls = 0

    def __call__(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        assert tokens.dtype == np.int64 and tokens.ndim == 1
        self.calls += 1
        history = np.vstack([state[0], tokens[None, :]])
        rows = [
            self.dist(int(history[0, i]), tuple(int(t) for t in history[2:, i])) for i in range(len(tokens))
        ]
        return np.stack(rows).astype(np.float32), (history,)


def images(*ids: int) -> State:
    return (np.array([ids], dtype=np.int64),)


def from_probs(spec: dict[int, float], vocab: int) -> np.ndarray:
    """Given probabilities for some tokens, spread the rest of the mass evenly over the others."""
    rest = [t for t in range(vocab) if t not in spec]
    probs = np.full(vocab, (1.0 - sum(spec.values())) / max(len(rest), 1))
    for t, p in spec.items():
        probs[t] = p
    with np.errstate(divide="ignore"):  # a zero leaves -inf, which the decoders must handle
        return np.log(probs)


def tree_dist(tree: dict[tuple[int, ...], dict[int, float]], vocab: int) -> Dist:
    return lambda image, prefix: from_probs(tree.get(prefix, {}), vocab)


def random_dist(vocab: int, seed: int = 0, scale: float = 2.0) -> Dist:
    def dist(image: int, prefix: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, image, len(prefix), *prefix])
        return log_softmax(rng.normal(size=vocab) * scale)

    return dist


class LSTMStep:
    """A small random numpy LSTM: a realistic float state (h, c) shaped [1, batch, hidden]."""

    def __init__(self, vocab: int = 12, hidden: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.embed = rng.normal(size=(vocab + 100, hidden))  # room for START
        self.w = rng.normal(size=(2 * hidden, 4 * hidden)) / np.sqrt(hidden)
        self.out = rng.normal(size=(hidden, vocab)) * 2.0
        self.hidden = hidden

    def init(self, n: int, seed: int = 1) -> State:
        h = np.tanh(np.random.default_rng(seed).normal(size=(1, n, self.hidden)))
        return h, np.zeros_like(h)

    def __call__(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        h, c = state[0][0], state[1][0]
        gates = np.concatenate([self.embed[tokens], h], axis=1) @ self.w
        i, f, g, o = np.split(gates, 4, axis=1)
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        return log_softmax(h @ self.out), (h[None], c[None])


def exhaustive(dist: Dist, image: int, vocab: int, end: int, max_len: int, alpha: float) -> list[tuple]:
    """Every finished sequence of one to max_len - 1 words, scored as the decoder scores them, best first."""
    words = [t for t in range(vocab) if t != end]
    found = []
    for n in range(1, max_len):
        for seq in itertools.product(words, repeat=n):
            lp = sum(float(dist(image, seq[:i])[t]) for i, t in enumerate(seq)) + float(dist(image, seq)[end])
            found.append((lp / (n + 1) ** alpha, list(seq), lp))
    return sorted(found, key=lambda f: f[0], reverse=True)


def reference_beam(dist: Dist, image: int, vocab: int, end: int, k: int, max_len: int, alpha: float) -> list:
    """Plain one-image beam search: a finished beam leaves the beam and gives up its slot; no empty caption."""
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    pool = []
    for _ in range(max_len):
        cands = [(lp + float(dist(image, seq)[t]), seq, t) for seq, lp in beams for t in range(vocab)
                 if seq or t != end]
        cands.sort(key=lambda c: c[0], reverse=True)
        beams = []
        for lp, seq, t in cands[: k - len(pool)]:
            if t == end:
                pool.append((lp / (len(seq) + 1) ** alpha, list(seq)))
            else:
                beams.append((seq + (t,), lp))
        if not beams:
            break
    if not pool:
        pool = [(lp / max_len**alpha, list(seq)) for seq, lp in beams]
    return sorted(pool, key=lambda p: p[0], reverse=True)


def path_log_prob(dist: Dist, image: int, hyp: Hypothesis, end: int) -> float:
    seq = tuple(hyp.tokens) + ((end,) if hyp.finished else ())
    return sum(float(dist(image, seq[:i])[t]) for i, t in enumerate(seq))


# ---------------------------------------------------------------------------------------------------------


def test_beam_width_one_is_greedy_on_an_lstm() -> None:
    step = LSTMStep()
    state = step.init(6)
    g = greedy(step, state, START, end_id=3, max_len=15)
    b = beam_search(step, state, START, end_id=3, beam_size=1, max_len=15)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [h.finished for h in g] == [hs[0].finished for hs in b]
    assert [h.log_prob for h in g] == pytest.approx([hs[0].log_prob for hs in b])


def test_beam_width_one_is_greedy_on_random_tables() -> None:
    step = OracleStep(random_dist(vocab=5, seed=3))
    g = greedy(step, images(0, 1, 2, 3), START, end_id=0, max_len=8)
    b = beam_search(step, images(0, 1, 2, 3), START, end_id=0, beam_size=1, max_len=8)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]


def test_beam_escapes_the_greedy_trap() -> None:
    a, b, end = 0, 1, 2
    # `a` looks best first but every continuation is unlikely; `b` is followed by <end> almost surely.
    tree = {(): {a: 0.6, b: 0.4}, (a,): {a: 0.35, b: 0.35, end: 0.3}, (b,): {end: 0.99}}
    dist = tree_dist(tree, vocab=3)
    g = greedy(OracleStep(dist), images(0), START, end, max_len=5)[0]
    best = beam_search(OracleStep(dist), images(0), START, end, beam_size=2, max_len=5)[0][0]
    assert g.tokens[0] == a
    assert best.tokens == [b] and best.finished
    assert best.log_prob > g.log_prob
    assert best.log_prob == pytest.approx(np.log(0.4) + np.log(0.99), abs=1e-5)


def test_no_end_falls_back_to_best_partial() -> None:
    never_end = lambda image, prefix: from_probs({3: 1e-12, 1: 0.5}, vocab=4)  # noqa: E731
    hyps = beam_search(OracleStep(never_end), images(0, 1), START, 3, beam_size=3, max_len=7, n_best=2)
    for alternatives in hyps:
        assert len(alternatives) == 2
        assert all(not h.finished and len(h.tokens) == 7 for h in alternatives)
        assert alternatives[0].tokens == [1] * 7
        assert alternatives[0].score >= alternatives[1].score
        assert alternatives[0].score == pytest.approx(alternatives[0].log_prob / 7)
    g = greedy(OracleStep(never_end), images(0), START, 3, max_len=7)[0]
    assert not g.finished and g.tokens == [1] * 7


def _target_dist(targets: dict[int, list[int]], vocab: int, end: int) -> Dist:
    """Image i says targets[i] then <end>, each with high probability, over random noise."""
    noise = random_dist(vocab, seed=7, scale=0.5)

    def dist(image: int, prefix: tuple[int, ...]) -> np.ndarray:
        target = targets[image]
        nxt = target[len(prefix)] if len(prefix) < len(target) else end
        logits = noise(image, prefix).astype(np.float64)
        logits[nxt] += 4.0
        return log_softmax(logits)

    return dist


def test_batch_of_mixed_lengths_equals_each_image_alone() -> None:
    end = 0
    dist = _target_dist({0: [2], 1: [3, 4, 5, 1, 2], 2: [5, 5, 1]}, vocab=6, end=end)
    together = beam_search(OracleStep(dist), images(0, 1, 2), START, end, beam_size=3, max_len=10, n_best=3)
    alone = [
        beam_search(OracleStep(dist), images(i), START, end, beam_size=3, max_len=10, n_best=3)[0]
        for i in range(3)
    ]
    assert together == alone
    assert together[0][0].tokens == [2]  # ends at step 2
    assert together[1][0].tokens == [3, 4, 5, 1, 2]  # ends at step 6
    g_together = greedy(OracleStep(dist), images(0, 1, 2), START, end, max_len=10)
    assert g_together == [greedy(OracleStep(dist), images(i), START, end, max_len=10)[0] for i in range(3)]


def test_batch_independence_with_an_lstm_state() -> None:
    step = LSTMStep(seed=4)
    state = step.init(5, seed=5)
    together = beam_search(step, state, START, end_id=2, beam_size=4, max_len=12, n_best=2)
    for i in range(5):
        single = tuple(s[:, i : i + 1] for s in state)
        alone = beam_search(step, single, START, end_id=2, beam_size=4, max_len=12, n_best=2)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in together[i]])


def test_length_penalty_trades_short_for_long() -> None:
    a, b, c, d, end = range(5)
    tree = {
        (): {a: 0.37, b: 0.6},
        (a,): {end: 0.37},  # short: a <end>, log-prob about -1.99 over 2 tokens
        (b,): {c: 0.8},
        (b, c): {d: 0.8},
        (b, c, d): {end: 0.25},  # long: b c d <end>, log-prob about -2.34 over 4 tokens
    }
    dist = tree_dist(tree, vocab=5)
    raw = beam_search(OracleStep(dist), images(0), START, end, beam_size=3, max_len=6, length_penalty=0.0)
    normalised = beam_search(
        OracleStep(dist), images(0), START, end, beam_size=3, max_len=6, length_penalty=1.0
    )
    assert raw[0][0].tokens == [a]
    assert normalised[0][0].tokens == [b, c, d]
    assert normalised[0][0].score == pytest.approx(normalised[0][0].log_prob / 4)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_equals_exhaustive_search_when_wide_enough(alpha: float) -> None:
    vocab, end, max_len = 4, 3, 3
    dist = random_dist(vocab, seed=11, scale=1.5)
    wide = vocab**max_len  # no prefix is ever pruned
    everything = exhaustive(dist, 0, vocab, end, max_len, alpha)
    hyps = beam_search(
        OracleStep(dist), images(0, 1), START, end, wide, max_len, alpha, n_best=len(everything)
    )
    for image, found in enumerate(hyps):
        expected = exhaustive(dist, image, vocab, end, max_len, alpha)
        assert [h.tokens for h in found] == [e[1] for e in expected]
        assert [h.score for h in found] == pytest.approx([e[0] for e in expected], abs=1e-5)
        assert [h.log_prob for h in found] == pytest.approx([e[2] for e in expected], abs=1e-5)
        assert all(h.finished for h in found)
    best = beam_search(OracleStep(dist), images(0), START, end, wide, max_len, alpha, n_best=1)[0]
    assert best[0].tokens == everything[0][1]


@pytest.mark.parametrize(("k", "alpha"), [(2, 0.0), (3, 1.0), (5, 0.7), (4, 1.0)])
def test_beam_equals_a_plain_reference_beam_search(k: int, alpha: float) -> None:
    vocab, end, max_len = 7, 0, 9
    dist = random_dist(vocab, seed=k, scale=0.8)
    for n_best in (1, 2, k):  # fewer than k lets the search stop before every slot has finished
        hyps = beam_search(OracleStep(dist), images(0, 1, 2, 3), START, end, k, max_len, alpha, n_best=n_best)
        for image, found in enumerate(hyps):
            expected = reference_beam(dist, image, vocab, end, k, max_len, alpha)[:n_best]
            assert [h.tokens for h in found] == [e[1] for e in expected]
            assert [h.score for h in found] == pytest.approx([e[0] for e in expected], abs=1e-5)


def test_early_stop_waits_for_a_long_hypothesis_that_normalisation_favours() -> None:
    a, b, c, end = range(4)
    # After step 2, "a <end>" scores -1.0/2 and the live "b c" has log-prob -1.61: one more token could
    # not beat -0.5, but "b c c c <end>" (log-prob about -1.64 over 5) does.
    tree = {(): {a: np.exp(-0.7), b: 0.2}, (a,): {end: np.exp(-0.3)}}
    tree |= {(b,) + (c,) * i: {c: 0.99} for i in range(3)} | {(b, c, c, c): {end: 0.99}}
    step = OracleStep(tree_dist(tree, vocab=4))
    best = beam_search(step, images(0), START, end, beam_size=2, max_len=6, length_penalty=1.0)[0][0]
    assert best.tokens == [b, c, c, c]


def test_no_decoder_returns_an_empty_caption() -> None:
    # <end> first is the likeliest path by far, and the best per word: every decoder must say something.
    vocab, end, a, b = 4, 0, 1, 2
    dist = tree_dist({(): {end: 0.9, a: 0.06, b: 0.04}, (a,): {end: 0.5, b: 0.5}, (b,): {end: 0.99}}, vocab)
    assert greedy(OracleStep(dist), images(0), START, end, 5)[0].tokens == [a]
    found = beam_search(OracleStep(dist), images(0), START, end, 3, 5, n_best=3)[0]
    assert found and all(h.tokens for h in found) and found[0].tokens == [b]
    assert found[0].log_prob == pytest.approx(np.log(0.04) + np.log(0.99), abs=1e-5)  # the model's, not renormalised
    drawn = sample(OracleStep(dist), images(*range(200)), START, end, 5, rng=np.random.default_rng(0))
    assert all(h.tokens and h.tokens[0] in (a, b) for h in drawn)


def test_tokens_that_are_not_words_are_never_generated() -> None:
    # <pad> (3) wins every step but the first: its score means nothing, as it was never a training target.
    vocab, end, a, pad = 4, 0, 1, 3
    dist = tree_dist({(): {a: 0.6, pad: 0.4}, (a,): {pad: 0.7, end: 0.2, a: 0.1}, (a, a): {end: 1.0}}, vocab)
    assert greedy(OracleStep(dist), images(0), START, end, 5)[0].tokens == [a, pad]  # unless told
    assert greedy(OracleStep(dist), images(0), START, end, 5, never=(pad,))[0].tokens == [a]
    found = beam_search(OracleStep(dist), images(0), START, end, 3, 5, n_best=2, never=(pad,))[0]
    assert [h.tokens for h in found] == [[a, a], [a]]  # mean log-prob per word: -0.94 and -1.06
    drawn = sample(OracleStep(dist), images(*range(100)), START, end, 5, rng=np.random.default_rng(1), never=(pad,))
    assert all(pad not in h.tokens for h in drawn) and {tuple(h.tokens) for h in drawn} == {(a,), (a, a)}


def test_beam_log_probs_are_the_paths_log_probs() -> None:
    dist = random_dist(vocab=6, seed=2)
    for hyp in beam_search(OracleStep(dist), images(5), START, 0, beam_size=3, max_len=6, n_best=3)[0]:
        assert hyp.log_prob == pytest.approx(path_log_prob(dist, 5, hyp, 0), abs=1e-5)


def test_greedy_stops_when_all_images_ended() -> None:
    step = OracleStep(_target_dist({0: [1], 1: [2]}, vocab=4, end=0))
    hyps = greedy(step, images(0, 1), START, 0, max_len=20)
    assert [h.tokens for h in hyps] == [[1], [2]]
    assert all(h.finished for h in hyps)
    assert step.calls == 2
    assert hyps[0].score == pytest.approx(hyps[0].log_prob / 2)


def test_beam_stops_early_once_settled() -> None:
    step = OracleStep(_target_dist({0: [1], 1: [2]}, vocab=4, end=0))
    beam_search(step, images(0, 1), START, 0, beam_size=2, max_len=20, length_penalty=0.0)
    assert step.calls < 20


def test_sample_top_k_one_is_greedy() -> None:
    step = LSTMStep(seed=2)
    state = step.init(5)
    g = greedy(step, state, START, end_id=1, max_len=10)
    s = sample(
        step, state, START, end_id=1, max_len=10, temperature=0.7, top_k=1, rng=np.random.default_rng(0)
    )
    assert [h.tokens for h in s] == [h.tokens for h in g]


def test_sample_is_reproducible_with_a_seeded_rng() -> None:
    dist = random_dist(vocab=6, seed=5, scale=1.0)
    run = lambda seed: sample(OracleStep(dist), images(0, 1, 2, 3), START, 0, rng=np.random.default_rng(seed))  # noqa: E731
    assert run(123) == run(123)
    draws = [h.tokens for seed in range(5) for h in run(seed)]
    assert len({tuple(t) for t in draws}) > 1
    for image, hyp in enumerate(run(9)):
        assert hyp.log_prob == pytest.approx(path_log_prob(dist, image, hyp, 0), abs=1e-5)


def test_sample_top_k_stays_in_the_top_k() -> None:
    dist = random_dist(vocab=8, seed=1)
    hyps = sample(
        OracleStep(dist), images(0, 1, 2), START, 0, max_len=6, top_k=2, rng=np.random.default_rng(1)
    )
    for image, hyp in enumerate(hyps):
        for i, token in enumerate(hyp.tokens):
            assert token in np.argsort(-dist(image, tuple(hyp.tokens[:i])))[:2]


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_sample_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        sample(OracleStep(random_dist(4)), images(0), START, 0, temperature=temperature)


def test_argument_validation() -> None:
    step = OracleStep(random_dist(4))
    with pytest.raises(ValueError, match="top_k"):
        sample(step, images(0), START, 0, top_k=-1)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(step, images(0), START, 0, beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(step, images(0), START, 0, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy(step, images(0), START, 0, max_len=0)


# --- per-image context (the attention decoder's grid and projection) --------------------------------------


class ContextOracle:
    """OracleStep for a context step: the image id comes from per-image context arrays (batch on axis 0),
    the state holds only the fed tokens, and the attention weights are a known function of (image, prefix).

    Both context arrays carry the image id at every position, so a row whose context was expanded or
    re-indexed wrongly reads another image's distribution (or trips the consistency assert).
    """

    def __init__(self, dist: Dist, positions: int = 5):
        self.dist, self.positions, self.calls = dist, positions, 0

    def context(self, *ids: int) -> tuple[np.ndarray, np.ndarray]:
        ids_ = np.array(ids, dtype=np.float32)
        return np.repeat(ids_[:, None, None], self.positions, 1), np.repeat(ids_[:, None, None], self.positions, 1)

    @staticmethod
    def state(n: int) -> State:
        return (np.zeros((0, n), dtype=np.int64),)

    def alpha(self, image: int, prefix: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([77, image, len(prefix), *prefix])
        return np.exp(log_softmax(rng.normal(size=self.positions)))

    def __call__(self, tokens: np.ndarray, state: State, context: tuple[np.ndarray, ...]):
        grid, projection = context
        assert grid.shape[0] == projection.shape[0] == len(tokens) == state[0].shape[1]
        assert np.array_equal(grid, projection)
        self.calls += 1
        history = np.vstack([state[0], tokens[None, :]])
        ids = [int(grid[i, 0, 0]) for i in range(len(tokens))]
        prefixes = [tuple(int(t) for t in history[1:, i]) for i in range(len(tokens))]
        log_probs = np.stack([self.dist(im, pre) for im, pre in zip(ids, prefixes, strict=True)])
        alphas = np.stack([self.alpha(im, pre) for im, pre in zip(ids, prefixes, strict=True)])
        return log_probs.astype(np.float32), (history,), alphas.astype(np.float32)


def assert_attention_follows_path(step: ContextOracle, image: int, hyp: Hypothesis) -> None:
    assert hyp.attention is not None and hyp.attention.shape == (len(hyp.tokens), step.positions)
    for t in range(len(hyp.tokens)):
        assert np.allclose(hyp.attention[t], step.alpha(image, tuple(hyp.tokens[:t])), atol=1e-6)


def test_context_beam_width_one_is_greedy() -> None:
    step = ContextOracle(random_dist(vocab=5, seed=3))
    ids = (0, 1, 2, 3)
    g = greedy(step, step.state(4), START, 0, max_len=8, context=step.context(*ids))
    b = beam_search(step, step.state(4), START, 0, beam_size=1, max_len=8, context=step.context(*ids))
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [h.log_prob for h in g] == pytest.approx([hs[0].log_prob for hs in b])
    for image, (h, hs) in enumerate(zip(g, b, strict=True)):
        assert np.array_equal(h.attention, hs[0].attention)
        assert_attention_follows_path(step, image, h)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_context_beam_equals_exhaustive_search_on_a_tiny_vocabulary(alpha: float) -> None:
    vocab, end, max_len = 3, 2, 4
    dist = random_dist(vocab, seed=13, scale=1.5)
    step = ContextOracle(dist)
    wide = vocab**max_len
    n_all = len(exhaustive(dist, 0, vocab, end, max_len, alpha))
    hyps = beam_search(step, step.state(3), START, end, wide, max_len, alpha, n_best=n_all,
                       context=step.context(4, 5, 6))
    for image, found in zip((4, 5, 6), hyps, strict=True):
        expected = exhaustive(dist, image, vocab, end, max_len, alpha)
        assert [h.tokens for h in found] == [e[1] for e in expected]
        assert [h.score for h in found] == pytest.approx([e[0] for e in expected], abs=1e-5)
        for h in found:
            assert_attention_follows_path(step, image, h)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_context_beam_equals_a_plain_reference_beam_search(k: int) -> None:
    vocab, end, max_len = 6, 0, 8
    dist = random_dist(vocab, seed=20 + k, scale=0.8)
    step = ContextOracle(dist)
    hyps = beam_search(step, step.state(3), START, end, k, max_len, 1.0, n_best=k, context=step.context(7, 8, 9))
    for image, found in zip((7, 8, 9), hyps, strict=True):
        expected = reference_beam(dist, image, vocab, end, k, max_len, 1.0)[:k]
        assert [h.tokens for h in found] == [e[1] for e in expected]
        for h in found:
            assert_attention_follows_path(step, image, h)


def test_context_batch_of_mixed_lengths_equals_each_image_alone() -> None:
    end = 0
    dist = _target_dist({0: [2], 1: [3, 4, 5, 1, 2], 2: [5, 5, 1]}, vocab=6, end=end)
    step = ContextOracle(dist)
    together = beam_search(step, step.state(3), START, end, beam_size=3, max_len=10, n_best=3,
                           context=step.context(0, 1, 2))
    for i in range(3):
        alone = beam_search(step, step.state(1), START, end, beam_size=3, max_len=10, n_best=3,
                            context=step.context(i))[0]
        assert alone == together[i]
        assert all(np.array_equal(a.attention, b.attention) for a, b in zip(alone, together[i], strict=True))
    assert together[1][0].tokens == [3, 4, 5, 1, 2]


def test_context_fallback_to_partial_beams_keeps_their_attention() -> None:
    never_end = lambda image, prefix: from_probs({3: 1e-12, 1: 0.5}, vocab=4)  # noqa: E731
    step = ContextOracle(never_end)
    hyps = beam_search(step, step.state(2), START, 3, beam_size=3, max_len=5, n_best=2, context=step.context(0, 1))
    for image, alternatives in enumerate(hyps):
        assert all(not h.finished and len(h.tokens) == 5 for h in alternatives)
        for h in alternatives:
            assert_attention_follows_path(step, image, h)


def test_context_sampling_keeps_each_paths_attention() -> None:
    step = ContextOracle(random_dist(vocab=6, seed=5, scale=1.0))
    hyps = sample(step, step.state(4), START, 0, max_len=7, rng=np.random.default_rng(2),
                  context=step.context(0, 1, 2, 3))
    for image, hyp in enumerate(hyps):
        assert_attention_follows_path(step, image, hyp)
        assert hyp.log_prob == pytest.approx(path_log_prob(step.dist, image, hyp, 0), abs=1e-5)


def test_without_context_there_is_no_attention() -> None:
    step = LSTMStep()
    assert all(h.attention is None for h in greedy(step, step.init(2), START, end_id=3, max_len=5))
    assert all(h.attention is None for hs in beam_search(step, step.init(2), START, 3, 2, 5) for h in hs)


def test_beam_candidates_are_the_k_best_ties_to_the_lower_index() -> None:
    """Beam search's candidate pick against a full stable sort, on scores with ties and -inf (banned or dead)."""
    from capcli import decode

    rng = np.random.default_rng(0)
    for trial in range(200):
        k = int(rng.integers(1, 6))
        scores = rng.integers(-4, 1, size=(3, 7)).astype(np.float64)  # few values: ties everywhere
        scores[rng.random(scores.shape) < 0.4] = -np.inf
        index, value = decode.beam.top_k(scores, k)
        for row in range(3):
            order = np.argsort(-scores[row], kind="stable")
            want = [int(i) for i in order[:k] if scores[row, i] > -np.inf]
            assert index[row, : len(want)].tolist() == want, (trial, scores[row], k)
            assert value[row].tolist() == [scores[row, i] for i in want] + [-np.inf] * (k - len(want))


def test_an_image_that_has_settled_is_not_stepped_again() -> None:
    """Image 0 ends after one word, image 1 after five: from then on the step sees image 1's beams only."""
    end = 0
    step = ContextOracle(_target_dist({0: [2], 1: [3, 4, 5, 1, 2]}, vocab=6, end=end))
    rows_seen = []
    counting = lambda tokens, state, context: rows_seen.append(len(tokens)) or step(tokens, state, context)  # noqa: E731
    together = beam_search(counting, step.state(2), START, end, beam_size=3, max_len=10, context=step.context(0, 1))
    assert [h[0].tokens for h in together] == [[2], [3, 4, 5, 1, 2]]
    assert rows_seen[0] == 6 and rows_seen[-1] == 3, rows_seen


def test_greedy_steps_only_the_captions_still_running() -> None:
    end = 0
    step = ContextOracle(_target_dist({0: [2], 1: [3, 4, 5, 1, 2]}, vocab=6, end=end))
    rows_seen = []
    counting = lambda tokens, state, context: rows_seen.append(len(tokens)) or step(tokens, state, context)  # noqa: E731
    found = greedy(counting, step.state(2), START, end, max_len=10, context=step.context(0, 1))
    assert [h.tokens for h in found] == [[2], [3, 4, 5, 1, 2]]
    assert rows_seen[:2] == [2, 2] and rows_seen[2:] == [1] * (len(rows_seen) - 2), rows_seen
