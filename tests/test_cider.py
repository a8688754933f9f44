"""The reward's CIDEr-D against pycocoevalcap's, on real Flickr8k references."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from pycocoevalcap.cider.cider import Cider

from capcli.metrics import score_captions, simple_tokenize
from capcli.train.cider import CiderD

TOKENS = Path(__file__).parent / "data" / "flickr8k_token" / "Flickr8k.token.txt"


@pytest.fixture(scope="module")
def references() -> dict[str, list[str]]:
    refs: dict[str, list[str]] = defaultdict(list)
    for line in TOKENS.read_text().splitlines():
        key, _, caption = line.partition("\t")
        refs[key.partition("#")[0]].append(caption)
    return dict(refs)


def candidates_for(references: dict[str, list[str]]) -> dict[str, str]:
    """A mix that exercises every branch: exact references, rewordings, one word, nothing, unseen and repeated words."""
    images = sorted(references)
    made = {}
    for i, image in enumerate(images):
        refs = references[image]
        made[image] = [
            refs[0],
            " ".join(refs[1].split()[::-1]),
            "a dog",
            "dog",
            "",
            "zebra quantum xylophone",
            "a a a a a a man man man",
            f"{refs[2]} and {refs[3]}",
        ][i % 8]
    return made


def coco(references: dict[str, list[str]], candidates: dict[str, str]) -> tuple[float, list[float]]:
    gts = {k: [simple_tokenize(r) for r in v] for k, v in references.items()}
    res = {k: [simple_tokenize(candidates[k])] for k in references}
    mean, per_image = Cider().compute_score(gts, res)
    return float(mean), [float(s) for s in per_image]


def test_equal_to_pycocoevalcap_per_image_and_corpus(references):
    candidates = candidates_for(references)
    mean, per_image = coco(references, candidates)
    cider = CiderD(references)
    ours = [cider.score(image, candidates[image]) for image in references]
    assert ours == pytest.approx(per_image, abs=1e-6)
    assert cider.corpus_score(candidates) == pytest.approx(mean, abs=1e-6)
    # and so equal to what capcli's metrics report (0-100 scale) with the simple tokenizer
    reported = score_captions(references, candidates, meteor=False, tokenizer="simple").values["CIDEr-D"]
    assert 100 * cider.corpus_score(candidates) == pytest.approx(reported, abs=1e-4)


def test_training_frequencies_are_fixed_once(references):
    """Built from one set of references (training), it scores any caption of those images without recomputing."""
    cider = CiderD(references)
    image = sorted(references)[0]
    first = cider.score(image, references[image][0])
    # scoring other captions, of other images, leaves the document frequencies (and so the reward) unchanged
    cider.scores(sorted(references), ["a man"] * len(references))
    assert cider.score(image, references[image][0]) == first
    # a subset's own frequencies give another number: the reward uses the training corpus's
    subset = {k: references[k] for k in sorted(references)[:3]}
    assert CiderD(subset).score(image, references[image][0]) != pytest.approx(first)


def test_scores_repeat_captions_consistently(references):
    cider = CiderD(references)
    images = sorted(references)[:2]
    pairs = [(images[0], "a dog runs"), (images[1], "a dog runs"), (images[0], "a dog runs")]
    scores = cider.scores([p[0] for p in pairs], [p[1] for p in pairs])
    assert scores[0] == scores[2] == cider.score(images[0], "a dog runs")
    assert scores[1] == cider.score(images[1], "a dog runs")


def test_unknown_image_and_empty_references():
    cider = CiderD({"a.jpg": ["a red circle"]})
    with pytest.raises(KeyError, match="b.jpg"):
        cider.score("b.jpg", "a red circle")
    with pytest.raises(ValueError, match="at least one"):
        CiderD({})
