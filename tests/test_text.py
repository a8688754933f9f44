"""Tokenisation and the vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capcli.data.records import CaptionDataset
from capcli.data.text import END, PAD, START, UNK, Vocabulary, build_vocabulary, tokenize
from capcli.errors import CapcliError


@pytest.mark.parametrize(
    ("caption", "words"),
    [
        ("A dog runs on the grass .", ["a", "dog", "runs", "on", "the", "grass"]),
        ("Two young , White males are outside", ["two", "young", "white", "males", "are", "outside"]),
        ("A girl holding a horse 's lead", ["a", "girl", "holding", "a", "horse", "lead"]),
        ("the dog's ball", ["the", "dog", "ball"]),
        ("don't stop", ["dont", "stop"]),
        ("do n't stop", ["dont", "stop"]),
        ("a sign saying 'stop'", ["a", "sign", "saying", "stop"]),
        ("Café: 3 dogs!!", ["cafe", "3", "dogs"]),
        ("  ...  ", []),
        ("three-legged dog", ["three", "legged", "dog"]),
    ],
)
def test_tokenize(caption, words):
    assert tokenize(caption) == words


def test_build_keeps_words_at_threshold_most_frequent_first():
    captions = ["a red dog", "a red cat", "a blue cat", "a dog"]
    vocab = Vocabulary.build(captions, threshold=2)
    # a:4, then cat/dog/red with 2 each in alphabetical order; blue (1) dropped.
    assert vocab.itos == [PAD, START, END, UNK, "a", "cat", "dog", "red"]
    assert len(vocab) == 8
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert Vocabulary.build(captions, threshold=1).stoi["blue"] == 8


def test_build_refuses_threshold_below_one():
    with pytest.raises(CapcliError):
        Vocabulary.build(["a"], threshold=0)


def test_encode_decode():
    vocab = Vocabulary.build(["a red dog", "a red dog"], threshold=2)
    ids = vocab.encode("A red unicorn dog")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[3] == vocab.unk_id
    assert vocab.decode(ids) == "a red <unk> dog"
    assert vocab.encode("a red dog", max_len=2) == [
        vocab.start_id,
        vocab.stoi["a"],
        vocab.stoi["red"],
        vocab.end_id,
    ]
    padded = [vocab.start_id, vocab.stoi["dog"], vocab.pad_id, vocab.end_id, vocab.stoi["red"]]
    assert vocab.decode(padded) == "dog"


def test_json_round_trip_and_file(tmp_path: Path):
    vocab = Vocabulary.build(["a red dog", "a blue dog"], threshold=1)
    data = vocab.to_json()
    assert data["format"] == "capcli-vocab/1" and data["threshold"] == 1
    assert Vocabulary.from_json(json.loads(json.dumps(data))) == vocab
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded.itos == vocab.itos and loaded.threshold == 1
    assert json.loads(path.read_text())["itos"][:4] == [PAD, START, END, UNK]


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"format": "other", "itos": [PAD, START, END, UNK]},
        {"format": "capcli-vocab/1", "itos": "abc"},
        {"format": "capcli-vocab/1", "itos": [START, PAD, END, UNK]},
        {"format": "capcli-vocab/1", "itos": [PAD, START, END, UNK, "a", "a"]},
        {"format": "capcli-vocab/1", "itos": [PAD, START, END, UNK], "threshold": "5"},
    ],
)
def test_from_json_rejects_bad_input(bad):
    with pytest.raises(CapcliError):
        Vocabulary.from_json(bad)


def test_load_errors_are_one_line(tmp_path: Path):
    with pytest.raises(CapcliError, match="no such vocabulary"):
        Vocabulary.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CapcliError, match="unreadable vocabulary"):
        Vocabulary.load(broken)


def test_sha256_is_stable_and_tracks_content():
    a = Vocabulary.build(["a red dog"], threshold=1)
    b = Vocabulary.from_json(a.to_json())
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert a.sha256 != Vocabulary.build(["a red cat"], threshold=1).sha256


def test_build_vocabulary_uses_training_split_only(tmp_path: Path):
    ds = CaptionDataset(
        name="t",
        format="kaggle",
        annotation=tmp_path / "captions.txt",
        images_dir=tmp_path,
        captions={"1.jpg": ["a dog"], "2.jpg": ["a dog"], "3.jpg": ["a zebra"], "4.jpg": ["a yak"]},
        splits={"train": ["1.jpg", "2.jpg"], "val": ["3.jpg"], "test": ["4.jpg"]},
    )
    vocab = build_vocabulary(ds, threshold=1)
    assert "dog" in vocab.stoi
    assert "zebra" not in vocab.stoi and "yak" not in vocab.stoi
    assert build_vocabulary(ds, threshold=3).itos == [PAD, START, END, UNK]
