"""Caption tokenisation and the word vocabulary, stored as JSON (never pickle)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capcli.errors import CapcliError
from capcli.paths import atomic_write_json

if TYPE_CHECKING:
    from capcli.data.records import CaptionDataset

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
VOCAB_FORMAT = "capcli-vocab/1"
# A vocabulary must know this share of the training captions' words: below it, captions are
# mostly <unk> (e.g. --threshold 1000 on a small set keeps "a" and little else).
MIN_COVERAGE = 0.75

_APOSTROPHES = "'\u2019\u2018`"
# Flickr captions write clitics apart ("horse 's", "do n't"): join them back to their word.
_DETACHED_CLITIC = re.compile(r"\s+(?='(?:s|re|ve|ll|d|m)\b|n't\b)")
_POSSESSIVE = re.compile(r"'s\b")
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str) -> list[str]:
    """Lowercase words of letters and digits.

    Accents are folded ("café" -> "cafe"); a possessive or "is" clitic is dropped ("dog's", "dog 's"
    -> "dog") and other apostrophes join their word ("don't" -> "dont"), so that one word does
    not spread over several vocabulary entries.
    """
    text = unicodedata.normalize("NFKD", caption)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    for mark in _APOSTROPHES:
        text = text.replace(mark, "'")
    text = _DETACHED_CLITIC.sub("", text)
    text = _POSSESSIVE.sub("", text).replace("'", "")
    return _WORD.findall(text)


class Vocabulary:
    """Words <-> ids; ids 0-3 are <pad>, <start>, <end>, <unk>."""

    def __init__(self, itos: list[str], threshold: int = 5) -> None:
        self.itos = list(itos)
        self.stoi = {word: i for i, word in enumerate(self.itos)}
        self.threshold = threshold

    @property
    def pad_id(self) -> int:
        return self.stoi[PAD]

    @property
    def start_id(self) -> int:
        return self.stoi[START]

    @property
    def end_id(self) -> int:
        return self.stoi[END]

    @property
    def unk_id(self) -> int:
        return self.stoi[UNK]

    @property
    def not_words(self) -> tuple[int, int]:
        """<pad> and <start>: never a training target, so never generated."""
        return self.pad_id, self.start_id

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words, threshold={self.threshold})"

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 5) -> Vocabulary:
        """Words seen at least `threshold` times, most frequent first, ties alphabetical."""
        if threshold < 1:
            raise CapcliError(f"vocabulary threshold must be at least 1, got {threshold}")
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= threshold), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept], threshold)

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """[<start>, word ids..., <end>], keeping at most `max_len` words."""
        words = tokenize(caption)
        if max_len is not None:
            words = words[:max_len]
        unk = self.unk_id
        return [self.start_id, *(self.stoi.get(w, unk) for w in words), self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>, without <start> and <pad>."""
        words = []
        skipped = {self.start_id, self.pad_id}
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in skipped:
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    def to_json(self) -> dict[str, Any]:
        return {"format": VOCAB_FORMAT, "itos": list(self.itos), "threshold": self.threshold}

    @classmethod
    def from_json(cls, d: Any) -> Vocabulary:
        if not isinstance(d, dict) or d.get("format") != VOCAB_FORMAT:
            raise CapcliError(f"not a capcli vocabulary (expected format {VOCAB_FORMAT!r})")
        itos = d.get("itos")
        if not isinstance(itos, list) or not all(isinstance(w, str) and w for w in itos):
            raise CapcliError("vocabulary 'itos' must be a list of non-empty words")
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise CapcliError(f"vocabulary must start with {', '.join(SPECIALS)}")
        if len(set(itos)) != len(itos):
            raise CapcliError("vocabulary has duplicate words")
        threshold = d.get("threshold", 5)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
            raise CapcliError("vocabulary 'threshold' must be a positive integer")
        return cls(itos, threshold)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CapcliError(f"{path}: no such vocabulary file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CapcliError(f"{path}: unreadable vocabulary ({type(exc).__name__})") from None
        try:
            return cls.from_json(data)
        except CapcliError as exc:
            raise CapcliError(f"{path}: {exc}") from None

    @property
    def sha256(self) -> str:
        """Content hash of the word list, recorded with models to catch a mismatched vocabulary."""
        return hashlib.sha256(json.dumps(self.itos, ensure_ascii=False).encode("utf-8")).hexdigest()


def build_vocabulary(ds: CaptionDataset, threshold: int = 5) -> Vocabulary:
    """The vocabulary of the training split only, so val/test words do not leak into the model."""
    return Vocabulary.build(
        (caption for image in ds.splits["train"] for caption in ds.captions[image]), threshold
    )


def check_coverage(ds: CaptionDataset, threshold: int) -> None:
    """Refuse a threshold whose vocabulary would leave over a quarter of the training words <unk>."""
    counts = _train_word_counts(ds)
    total = sum(counts.values())
    if total == 0:
        raise CapcliError("the training captions contain no words")
    known = [n for n in counts.values() if n >= threshold]
    if sum(known) >= MIN_COVERAGE * total:
        return
    raise CapcliError(
        f"--threshold {threshold} keeps {len(known)} word(s) and leaves {1 - sum(known) / total:.0%} of the "
        f"training captions' words as <unk>; a vocabulary must know at least {MIN_COVERAGE:.0%} of them: "
        f"use --threshold {_highest_usable_threshold(counts, total)} or lower"
    )


def _highest_usable_threshold(counts: Counter, total: int) -> int:
    covered = 0
    for n in sorted(counts.values(), reverse=True):
        covered += n
        if covered >= MIN_COVERAGE * total:
            return n
    return 1


def _train_word_counts(ds: CaptionDataset) -> Counter:
    return Counter(word for image in ds.splits["train"] for caption in ds.captions[image] for word in tokenize(caption))
