"""Issue 29 item 12: a captions CSV whose quoted image name holds a newline is one record (a caption's stray quote
still stays on its line), and a UTF-16 captions file is said to be UTF-16, not an unknown format."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_reliability_datasets import invoke, one_line_error

from capcli.data.readers import load_dataset

DATA = Path(__file__).parent / "data"


def test_a_quoted_image_name_holding_a_newline_is_one_record(tmp_path):
    """Before: the name was read as an unbalanced quote, the image reported missing under a mangled name and 5
    lines skipped."""
    (tmp_path / "Images").mkdir()
    names = ["a.jpg", "b.jpg", "we\nird.jpg"]
    for name in names:
        (tmp_path / "Images" / name).write_bytes((DATA / "flickr8k_kaggle" / "Images" / "1155138244_859fd6e079.jpg")
                                                 .read_bytes())
    rows = ["image,caption"] + [f"{n},a dog runs on the grass" for n in names[:2] for _ in range(5)]
    rows += ['"we\nird.jpg",a cat sits on a mat'] * 5
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = load_dataset(str(tmp_path))
    assert sorted(ds.captions) == sorted(names)
    assert ds.captions["we\nird.jpg"] == ["a cat sits on a mat"] * 5
    assert ds.notes == []
    assert ds.image_path("we\nird.jpg").is_file()


def test_a_stray_quote_in_a_caption_still_stays_on_its_line(tmp_path):
    """What the line-by-line reading is for: a caption's stray quote never swallows the rows after it."""
    rows = ["image,caption", 'a.jpg,"a dog runs', "b.jpg,a cat sits", 'c.jpg,"a "bird" flies', "d.jpg,a fish"]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = load_dataset(str(tmp_path / "captions.txt"))
    assert sorted(ds.captions) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert ds.captions["b.jpg"] == ["a cat sits"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_a_utf16_captions_file_is_said_to_be_not_utf8(tmp_path, encoding):
    """Before: 'unknown annotation format', where Latin-1 correctly said 'not UTF-8 text'."""
    text = (DATA / "flickr8k_kaggle" / "captions.txt").read_text(encoding="utf-8")
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").write_text(text, encoding=encoding)
    line = one_line_error(invoke("data", "info", tmp_path))
    assert "not UTF-8 text" in line and "UTF-16" in line, line
