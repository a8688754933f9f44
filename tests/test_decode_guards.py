"""The decoding guards for photos far from the training data: <unk> suppression and the n-gram repetition block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decode import START, OracleStep, from_probs, images, random_dist

from capcli.data.text import Vocabulary
from capcli.decode import beam_search, greedy, sample
from capcli.runtime.captioner import NO_GUARDS, Guards, caption_images, decode_hypotheses, open_captioner

END, UNK = 2, 3  # as in every capcli vocabulary: <pad> 0, <start> 1, <end> 2, <unk> 3


def repeated_ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return sorted({g for g in grams if grams.count(g) > 1})


def looping(vocab: int) -> OracleStep:
    """A model lost on its image: after any prefix it wants "4 5 4 5 ..." and ends late."""
    def dist(image, prefix):
        nxt = 5 if prefix and prefix[-1] == 4 else 4
        return from_probs({nxt: 0.8, END: 0.01}, vocab)

    return OracleStep(dist)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_block_breaks_a_loop_in_every_decoding(n):
    step = looping(12)
    for hyp in [*greedy(step, images(0, 1), START, END, max_len=15, no_repeat_ngram=n),
                *sum(beam_search(step, images(0, 1), START, END, beam_size=3, max_len=15, no_repeat_ngram=n), []),
                *sample(step, images(0, 1), START, END, max_len=15, no_repeat_ngram=n, rng=np.random.default_rng(0))]:
        assert repeated_ngrams(hyp.tokens, n) == []
    unblocked = greedy(step, images(0), START, END, max_len=15)[0].tokens
    assert repeated_ngrams(unblocked, n), "the fake must loop without the block, or this test proves nothing"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), beam=st.integers(1, 4), vocab=st.integers(4, 9))
def test_no_decoding_ever_emits_a_repeated_ngram(seed, n, beam, vocab):
    step = OracleStep(random_dist(vocab, seed, scale=1.0))
    found = greedy(step, images(0, 1, 2), START, END, max_len=12, no_repeat_ngram=n)
    found += sum(beam_search(step, images(0, 1), START, END, beam_size=beam, n_best=beam, max_len=12,
                             no_repeat_ngram=n), [])
    found += sample(step, images(0, 1), START, END, max_len=12, no_repeat_ngram=n, rng=np.random.default_rng(seed))
    for hyp in found:
        assert hyp.tokens, "at least one word"
        assert repeated_ngrams(hyp.tokens, n) == []


class _Captioner:
    """Just what decode_hypotheses reads: a vocabulary, a length cap and a step."""

    def __init__(self, step, vocab: Vocabulary):
        self.step, self.vocab, self.max_len = step, vocab, 10


def unk_loving_vocab() -> Vocabulary:
    vocab = Vocabulary.build(["dog runs", "dog runs", "a dog"], threshold=1)
    assert vocab.unk_id == UNK and vocab.end_id == END
    return vocab


@pytest.mark.parametrize("beam", [1, 3])
def test_unk_is_suppressed_by_default_and_allowed_on_request(beam):
    vocab = unk_loving_vocab()
    words = [i for i in range(len(vocab)) if i not in (*vocab.not_words, UNK, END)]

    def dist(image, prefix):  # <unk> first, then a real word, then the end
        return from_probs({UNK: 0.6, words[0]: 0.3} if not prefix else {END: 0.9}, len(vocab))

    captioner = _Captioner(OracleStep(dist), vocab)
    guarded = decode_hypotheses(captioner, images(0), beam_size=beam)[0][0]
    assert UNK not in guarded.tokens and guarded.tokens == [words[0]]
    allowed = decode_hypotheses(captioner, images(0), beam_size=beam, guards=Guards(suppress_unk=False))[0][0]
    assert allowed.tokens == [UNK]


def test_both_runtimes_agree_with_the_guards(tiny_bundle, tiny_run, test_images):
    onnx_captioner = open_captioner(tiny_bundle, "onnx", provider="cpu")
    torch_captioner = open_captioner(tiny_run, "torch")
    for guards in (Guards(), Guards(suppress_unk=False, no_repeat_ngram=1), NO_GUARDS):
        for beam in (1, 3):
            a = caption_images(onnx_captioner, test_images, beam_size=beam, guards=guards)
            b = caption_images(torch_captioner, test_images, beam_size=beam, guards=guards)
            assert [r.caption for r in a] == [r.caption for r in b]
            if guards.no_repeat_ngram == 1:
                assert all(len(set(r.caption.split())) == len(r.caption.split()) for r in a)


def test_caption_without_model_uses_the_shipped_bundle(tiny_bundle, test_images, tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from capcli.cli import app

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_bundle, tmp_path / "exported" / "flickr8k")
    result = CliRunner().invoke(app, ["caption", str(test_images[0]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["caption"]


def test_from_any_folder_the_checkouts_shipped_bundle_is_found(tmp_path, monkeypatch):
    from capcli.runtime.captioner import default_model

    monkeypatch.chdir(tmp_path)  # no exported/ here: the checkout's own bundle, wherever the command runs
    assert default_model().resolve() == (Path(__file__).resolve().parents[1] / "exported" / "flickr8k").resolve()


def test_a_missing_shipped_bundle_is_one_clear_line(test_images, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import capcli.runtime.captioner
    from capcli.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(capcli.runtime.captioner, "SHIPPED_MODEL", "no-such-model")
    result = CliRunner().invoke(app, ["caption", str(test_images[0])])
    assert result.exit_code == 1
    assert "no --model given, and the shipped model is not in" in result.output
    assert "Traceback" not in result.output
