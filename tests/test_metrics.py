"""Caption metrics: our wrapper against pycocoevalcap's own scorers, tokenizers and skipped metrics."""

from __future__ import annotations

import math
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from capcli.metrics import java_available, score_captions, simple_tokenize

needs_java = pytest.mark.skipif(
    not java_available(), reason="java not found: PTB tokenizer and METEOR need it"
)

REFERENCES = {
    "1.jpg": [
        "A black dog runs across the green grass.",
        "A dog running on grass.",
        "The black dog is running in a field.",
        "A dog runs through a grassy field.",
        "Black dog running outside.",
    ],
    "2.jpg": [
        "Two children play on the beach.",
        "Kids playing in the sand by the sea.",
        "Two kids are playing at the beach.",
        "Children build a sandcastle on the beach.",
        "Two young children on a sandy beach.",
    ],
    "3.jpg": [
        "A man rides a red bicycle down the street.",
        "A cyclist on a red bike in the city.",
        "A man is riding his bike on a road.",
        "Man on a red bicycle.",
        "A person cycling down a busy street.",
    ],
    "4.jpg": [
        "A woman in a blue dress holds an umbrella.",
        "A lady with an umbrella in the rain.",
        "A woman is standing in the rain with an umbrella.",
        "Woman holding a blue umbrella.",
        "A woman walks with her umbrella.",
    ],
}
GOOD = {
    "1.jpg": "a black dog running on the grass",
    "2.jpg": "two kids playing on the beach",
    "3.jpg": "a man riding a red bike on the street",
    "4.jpg": "a woman holding an umbrella in the rain",
}
WRONG = {key: "a plate of food on a wooden table" for key in REFERENCES}
KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}


def direct(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
    """pycocoevalcap used by hand, on the 0-100 scale."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    values = {f"BLEU-{n + 1}": 100 * b for n, b in enumerate(bleu)}
    values["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    values["CIDEr-D"] = 100 * Cider().compute_score(gts, res)[0]
    return values


def test_simple_scores_equal_pycocoevalcap_on_the_same_tokens() -> None:
    scores = score_captions(REFERENCES, GOOD, meteor=False, tokenizer="simple")
    gts = {k: [simple_tokenize(r) for r in refs] for k, refs in REFERENCES.items()}
    res = {k: [simple_tokenize(c)] for k, c in GOOD.items()}
    assert scores.values == pytest.approx(direct(gts, res))
    assert scores.tokenizer == "simple"
    assert scores.n_images == 4
    assert set(scores.values) == KEYS


@needs_java
def test_ptb_scores_equal_pycocoevalcap_on_the_same_tokens() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scores = score_captions(REFERENCES, GOOD, meteor=False)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in refs] for k, refs in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in GOOD.items()})
    assert scores.tokenizer == "ptb"
    assert scores.values == pytest.approx(direct(gts, res))


def test_perfect_candidates_score_high_and_wrong_ones_low() -> None:
    perfect = score_captions(REFERENCES, {k: refs[0] for k, refs in REFERENCES.items()}, meteor=False)
    good = score_captions(REFERENCES, GOOD, meteor=False)
    wrong = score_captions(REFERENCES, WRONG, meteor=False)
    assert perfect.values["BLEU-4"] == pytest.approx(100.0, abs=1e-3)
    assert perfect.values["CIDEr-D"] > 150
    for key in KEYS:
        assert perfect.values[key] >= good.values[key] > wrong.values[key], key
        assert 0 <= wrong.values[key]


def test_empty_and_punctuation_only_candidates_do_not_crash() -> None:
    candidates = dict(GOOD, **{"1.jpg": "", "2.jpg": "..."})
    for tokenizer in ["simple", "auto"]:
        scores = score_captions(REFERENCES, candidates, meteor=False, tokenizer=tokenizer)
        assert all(math.isfinite(v) for v in scores.values.values())
    only_empty = score_captions({"a": ["a dog"]}, {"a": ""}, meteor=False)
    assert only_empty.values["BLEU-1"] == pytest.approx(0.0, abs=1e-6)
    assert only_empty.values["CIDEr-D"] == 0.0


def test_mismatched_ids_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="same images"):
        score_captions(REFERENCES, {"1.jpg": "a dog", "9.jpg": "a cat"}, meteor=False)
    with pytest.raises(ValueError, match="no reference"):
        score_captions({"1.jpg": []}, {"1.jpg": "a dog"}, meteor=False)
    with pytest.raises(ValueError, match="no captions"):
        score_captions({}, {}, meteor=False)
    with pytest.raises(ValueError, match="tokenizer"):
        score_captions(REFERENCES, GOOD, meteor=False, tokenizer="spacy")


@needs_java
def test_meteor_is_computed_when_java_is_present() -> None:
    # METEOR starts a JVM with a 2 GB heap: this is the only test that runs it.
    scores = score_captions(REFERENCES, dict(GOOD, **{"4.jpg": ""}))
    assert 0 < scores.values["METEOR"] <= 100
    assert scores.skipped == []
    assert scores.to_dict()["values"]["METEOR"] == scores.values["METEOR"]


def test_meteor_reported_as_skipped_when_disabled() -> None:
    scores = score_captions(REFERENCES, GOOD, meteor=False, tokenizer="simple")
    assert "METEOR" not in scores.values
    assert scores.skipped == ["METEOR (disabled)"]
    assert scores.to_dict() == {
        "values": scores.values,
        "tokenizer": "simple",
        "skipped": ["METEOR (disabled)"],
        "n_images": 4,
    }


def test_without_java_meteor_is_skipped_and_the_simple_tokenizer_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    assert not java_available()
    scores = score_captions(REFERENCES, GOOD)
    assert scores.tokenizer == "simple"
    assert "METEOR" not in scores.values
    assert scores.skipped == ["METEOR (java not found)"]
    with pytest.raises(ValueError, match="java"):
        score_captions(REFERENCES, GOOD, tokenizer="ptb")


def test_simple_tokenizer_lowercases_and_strips_punctuation() -> None:
    assert simple_tokenize("A Dog, running!  Fast.") == "a dog running fast"
    assert simple_tokenize("The black-and-white dog's ball (red)...") == "the black-and-white dog's ball red"
    assert simple_tokenize(" ... ") == ""
