"""The backbone's own classifier in the caption: the classes it sees in a photo, as words the decoder is steered to.

Every bundled backbone is an ImageNet classifier, and an encoder that has the head returns the class
probabilities beside the grid. A label set's shipped table (`imagenet-1k.json`, built from WordNet by
`capcli.guidance.wordnet_table`) lists the nouns each class supports, nearest first. `ClassWords` applies it to
one vocabulary: each class speaks through one caption word, the nearest the vocabulary holds, or a more general
one the captions use far more often (basic-level naming: golden retriever -> dog, tabby -> cat; the vocabulary
lists words most frequent first, so its order tells). Per image, a word's support is the summed probability of
its classes, and `ClassWords.bias` turns supports into what decoding adds to the log-probabilities:
- a bonus (shallow fusion) for confident words, `bonus` x support, until the caption holds the word; only for
  words outside the vocabulary's `common` most frequent ones: the captions the model was trained on name those
  often, so it places them itself where they fit, and steering it to them only moves it off its own captions;
- a guard: an animal word that many classes speak through (dog: 118 breeds, bird, cat, ...) is held back, with
  its kinds (dog: puppy, terrier, poodle, ...) and their plurals, on a photo where their summed probability is
  tiny: the classifier rules it out. Only animals: ImageNet
  covers them densely, while a ball or a building in a photo is often too small or too partial for its classes.
Both are on by default where the encoder returns class probabilities (`GuideOptions`), and off with
`GuideOptions(enabled=False)` (`--no-guidance`). numpy only.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

import numpy as np

from capcli.errors import CapcliError

TABLES = {"imagenet-1k": Path(__file__).with_name("imagenet-1k.json")}
BASIC_LEVEL_RATIO = 10  # a more general word replaces a class's nearest one when it ranks this many times higher
BONUS_DEPTH = 1  # a class steers to its word only when that word names it or its direct hypernym (animals: any)
GUARDED_COVERAGE = 5  # an animal word that at least this many classes speak through can be ruled out
MAX_BIAS = 100.0  # the largest bonus or penalty: log-probability units, where 100 already outweighs any word


@dataclass(frozen=True)
class GuideOptions:
    """How the backbone's classifier guides decoding; the defaults were chosen on Flickr8k val and COCO photos.

    Attributes:
        enabled: False decodes from the caption model alone.
        bonus: Added to a confident word's log-probability, times its support, until the caption holds it.
        min_support: A word is confident when its classes' probabilities sum to at least this.
        common: The vocabulary's this many most frequent words get no bonus (the decoder places them itself).
        guard: An animal word many classes speak through (dog, cat, bird...) is held back, with its kinds and
            plurals, where its support is below this: the classifier rules it out.
        penalty: How much a held-back word loses on its log-probability.
        top_classes: The classes reported per image (`CaptionResult.classes`).
        constrain: Constrained beam search (Anderson et al. 2017): a beam-searched caption must hold the most
            supported confident word, where its support is at least `constrain_support` (slower: those photos
            are searched with two groups of beams).
        constrain_support: The support from which `constrain` requires a word.

    Raises:
        ValueError: A value of the wrong type or out of its range: `bonus` and `penalty` from 0 to 100,
            `min_support` above 0 and at most 1, `guard` and `constrain_support` from 0 to 1 (supports are
            summed probabilities), `common` and `top_classes` integers of 0 or more (`top_classes=0` reports
            no class), `enabled` and `constrain` booleans, and `constrain` only with `enabled`.
    """

    enabled: bool = True
    bonus: float = 5.0  # added to a confident word's log-probability (x its support) until the caption holds it
    min_support: float = 0.3  # a word is confident when its classes' probabilities sum to at least this
    common: int = 300  # the vocabulary's this many most frequent words get no bonus: the decoder places them itself
    guard: float = 0.1  # a guarded word (and its plural) is held back below this support ...
    penalty: float = 8.0  # ... by this much on its log-probability
    top_classes: int = 3  # classes reported per image
    constrain: bool = False  # constrained beam search: the caption must hold the most supported confident word ...
    constrain_support: float = 0.6  # ... when its support is at least this

    def __post_init__(self) -> None:
        ranges = {"bonus": (0.0, MAX_BIAS, True), "penalty": (0.0, MAX_BIAS, True), "min_support": (0.0, 1.0, False),
                  "guard": (0.0, 1.0, True), "constrain_support": (0.0, 1.0, True)}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("enabled", "constrain"):
                if not isinstance(value, bool | np.bool_):
                    raise ValueError(f"GuideOptions.{f.name} must be True or False, not {value!r}")
            elif f.name in ("common", "top_classes"):
                if not isinstance(value, numbers.Integral) or isinstance(value, bool | np.bool_) or value < 0:
                    raise ValueError(f"GuideOptions.{f.name} must be an integer >= 0, not {value!r}")
            else:
                low, high, with_low = ranges[f.name]
                if (not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_)
                        or not math.isfinite(value) or not (low <= value if with_low else low < value) or value > high):
                    span = f"from {low:g} to {high:g}" if with_low else f"above {low:g} and at most {high:g}"
                    raise ValueError(f"GuideOptions.{f.name} must be a number {span}, not {value!r}")
        if self.constrain and not self.enabled:
            raise ValueError("GuideOptions(constrain=True) needs enabled=True: constrained search requires a word "
                             "the classifier supports")


@dataclass
class ImageClasses:
    """What the classifier said about one image and what decoding did with it.

    Attributes:
        classes: The likeliest classes, each (name, probability).
        boosted: The words steered towards, each with its support.
        ruled_out: The guarded words held back.
        required: The id of the word constrained beam search required, -1 for none.
        required_word: That word, None for none.
    """

    classes: list[tuple[str, float]]  # the most probable classes, (name, probability)
    boosted: dict[str, float] = field(default_factory=dict)  # word -> support, steered towards
    ruled_out: list[str] = field(default_factory=list)  # guarded words held back
    required: int = -1  # the most supported boosted word's id (constrained beam search), -1: none
    required_word: str | None = None  # ... and that word

    def to_json(self) -> dict:
        """The classes, boosted and ruled-out words, and under constrained search the word it required."""
        return {"classes": [{"name": n, "p": round(p, 4)} for n, p in self.classes],
                "boosted": {w: round(s, 4) for w, s in self.boosted.items()}, "ruled_out": self.ruled_out,
                **({"required": self.required_word} if self.required_word is not None else {})}


def can_guide(captioner) -> bool:
    """Whether guidance reaches the captioner's captions: its encoder returns the classes of a label set with a
    shipped table. Without that (pooled decoders, bundles exported before classifiers) it captions as if
    `GuideOptions(enabled=False)`, and constrained search has no word to require."""
    head = getattr(captioner, "classifier", None)
    return bool(head) and head.get("labels") in TABLES


def no_classifier(model: object, head: dict | None = None) -> str:
    """Why `constrain` cannot apply to `model`, whose classifier is `head` (one line, for the CLI's error, the
    API's ValueError and the server's 422)."""
    if head and head.get("labels") not in TABLES:
        return (f"{model}'s classes are of the label set '{head.get('labels')}', which has no word table "
                f"(available: {', '.join(TABLES)}), so there is no word to require")
    return (f"{model} has no classifier (its encoder returns no ImageNet classes: a pooled decoder, or a bundle "
            "exported before classifiers), so there is no word to require")


@cache
def load_table(labels: str) -> dict:
    """A label set's shipped class table: {"labels", "source", "classes": [{"id", "name", "words"}]}."""
    if labels not in TABLES:
        raise CapcliError(f"unknown label set '{labels}'; available: {', '.join(TABLES)}")
    return json.loads(TABLES[labels].read_text(encoding="utf-8"))


class ClassWords:
    """A label set's classes mapped onto one vocabulary (`itos`: most frequent word first, specials first)."""

    def __init__(self, table: dict, itos: list[str]):
        stoi = {w: i for i, w in enumerate(itos)}
        self.labels, self.vocab_size = table["labels"], len(itos)
        self.names = [c["name"].split(",")[0] for c in table["classes"]]
        spoken = [_spoken_word(c["words"], stoi) for c in table["classes"]]
        self.word_of = [w for w, _ in spoken]  # vocab id or -1
        self.columns = np.array(sorted({w for w in self.word_of if w >= 0}), dtype=np.int64)
        column = self.column_of = {w: j for j, w in enumerate(self.columns.tolist())}
        self.matrix = np.zeros((len(self.names), len(self.columns)), dtype=np.float32)  # class -> its word
        for c, w in enumerate(self.word_of):
            if w >= 0:
                self.matrix[c, column[w]] = 1.0
        animal = np.array([bool(c.get("animal")) for c in table["classes"]])
        # A general word a class reaches far up (bookcase -> furniture) says little about the photo: no bonus.
        near = np.array([depth <= BONUS_DEPTH for _, depth in spoken]) | animal
        self.bonus_matrix = self.matrix * near[:, None]
        coverage = self.matrix[animal].sum(0) * (self.matrix[~animal].sum(0) == 0)  # words of animals only
        kinds = table.get("kinds", {})
        self.guarded = [(int(self.columns[j]), _forms(itos[self.columns[j]], kinds, stoi))
                        for j in np.flatnonzero(coverage >= GUARDED_COVERAGE)]
        self.itos = itos

    def support(self, probs: np.ndarray) -> np.ndarray:
        """Class probabilities [B, classes] -> each mapped word's support [B, len(columns)]."""
        if probs.ndim != 2 or probs.shape[1] != len(self.names):
            raise CapcliError(f"class probabilities of shape {probs.shape} do not fit the {self.labels} table "
                              f"({len(self.names)} classes)")
        return probs.astype(np.float32) @ self.matrix

    def bias(self, probs: np.ndarray, options: GuideOptions = GuideOptions()) -> tuple[np.ndarray, list]:
        """Per-image additions to the log-probabilities [B, V] (positive: a bonus until the word is used; negative:
        a penalty at every step) and, per image, what the classifier saw (`ImageClasses`)."""
        support = self.support(probs)
        steer = probs.astype(np.float32) @ self.bonus_matrix  # support from classes a word names closely
        bias = np.zeros((len(probs), self.vocab_size), dtype=np.float32)
        found = []
        for i in range(len(probs)):
            top = np.argsort(-probs[i], kind="stable")[: options.top_classes]
            seen = ImageClasses([(self.names[c], float(probs[i, c])) for c in top])
            boosted = set()
            for j in np.flatnonzero((steer[i] >= options.min_support) & (self.columns >= options.common)):
                word = int(self.columns[j])
                bias[i, word] = options.bonus * steer[i, j]
                seen.boosted[self.itos[word]] = float(steer[i, j])
                boosted.add(word)
                best = seen.required < 0 or steer[i, j] > steer[i, self.column_of[seen.required]]
                if options.constrain and steer[i, j] >= options.constrain_support and best:
                    seen.required = word
            for word, forms in self.guarded:
                # A word the classes support enough to boost is not ruled out by them (a guard above
                # min_support would otherwise steer towards it and hold it back at once, and require it).
                if support[i, self.column_of[word]] < options.guard and word not in boosted:
                    bias[i, [f for f in forms if f not in boosted]] = -options.penalty
                    seen.ruled_out.append(self.itos[word])
            seen.required_word = self.itos[seen.required] if seen.required >= 0 else None
            found.append(seen)
        return bias, found


def _spoken_word(words: list[list], stoi: dict[str, int]) -> tuple[int, int]:
    """(vocabulary id, levels up) of the word a class speaks through: its nearest word the vocabulary holds,
    replaced by a more general one that ranks BASIC_LEVEL_RATIO times higher (more frequent); (-1, -1) for none."""
    chosen, depth = -1, -1
    for word, levels in words:  # nearest first
        rank = stoi.get(word, -1)
        if rank < 0:
            continue
        if chosen < 0 or rank * BASIC_LEVEL_RATIO <= chosen:
            chosen, depth = rank, levels
    return chosen, depth


def _forms(word: str, kinds: dict[str, list[str]], stoi: dict[str, int]) -> list[int]:
    """The vocabulary ids a guard holds back for `word`: the word, its kinds (dog: puppy, terrier, ...), and the
    plural of each."""
    words = [word, *kinds.get(word, ())]
    return sorted({i for w in words for i in ([stoi[w]] if w in stoi else []) + _plural(w, stoi)})


def _plural(word: str, stoi: dict[str, int]) -> list[int]:
    """The vocabulary ids of the word's regular plural."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        form = word + "es"
    elif word.endswith("y") and word[-2:-1] not in "aeiou":
        form = word[:-1] + "ies"
    else:
        form = word + "s"
    return [stoi[form]] if form in stoi else []
