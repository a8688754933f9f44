"""Dataset readers: formats, detection, image folders, splits, errors and dataset_info."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from capcli.data.info import dataset_info
from capcli.data.readers import load_dataset
from capcli.errors import CapcliError

DATA = Path(__file__).parent / "data"
KAGGLE = DATA / "flickr8k_kaggle"
TOKEN = DATA / "flickr8k_token"
QUIRK_IMAGE = "2258277193_586949ec62.jpg"  # written "2258277193_586949ec62.jpg.1" in Flickr8k.token.txt
COMMA_IMAGE = "1191338263_a4fa073154.jpg"


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return dst


def _assert_partition(ds) -> None:
    """Every image in exactly one split, splits sorted."""
    assert set(ds.splits) == {"train", "val", "test"}
    listed = [name for names in ds.splits.values() for name in names]
    assert sorted(listed) == ds.images and len(listed) == len(set(listed))
    assert all(names == sorted(names) for names in ds.splits.values())


# ---------------------------------------------------------------- formats


def test_kaggle_folder():
    ds = load_dataset(str(KAGGLE))
    assert (ds.name, ds.format) == ("flickr8k_kaggle", "kaggle")
    assert ds.annotation == KAGGLE / "captions.txt"
    assert ds.images_dir == KAGGLE / "Images"
    assert len(ds.images) == 19 and sum(len(c) for c in ds.captions.values()) == 95
    assert list(ds.captions) == ds.images == sorted(ds.captions)
    assert all(len(c) == 5 for c in ds.captions.values())
    # Quoted commas stay inside the caption.
    assert any("," in c for c in ds.captions[COMMA_IMAGE])
    assert ds.image_path(COMMA_IMAGE) == KAGGLE / "Images" / COMMA_IMAGE
    _assert_partition(ds)


def test_token_file_matches_kaggle_captions():
    kaggle = load_dataset(str(KAGGLE / "captions.txt"))
    token = load_dataset(str(TOKEN / "Flickr8k.token.txt"))
    assert token.format == "flickr8k_token" and token.name == "Flickr8k.token"
    for image in token.images:
        if image in kaggle.captions:
            assert token.captions[image] == kaggle.captions[image]


def test_token_split_lists_are_used_with_dev_as_val():
    ds = load_dataset(str(TOKEN))
    assert {s: len(n) for s, n in ds.splits.items()} == {"train": 10, "val": 4, "test": 4}
    dev = (TOKEN / "Flickr_8k.devImages.txt").read_text().split()
    assert ds.splits["val"] == sorted(dev)
    # Images in no split list (as in the real file) are left out, and said so.
    assert QUIRK_IMAGE not in ds.captions
    assert any("in no split list" in note for note in ds.notes)
    _assert_partition(ds)


def test_token_jpg_1_quirk_is_repaired(tmp_path: Path):
    token = _copy(TOKEN / "Flickr8k.token.txt", tmp_path / "Flickr8k.token.txt")
    ds = load_dataset(str(token))
    assert len(ds.captions[QUIRK_IMAGE]) == 5
    assert ds.captions[QUIRK_IMAGE][0] == "people waiting for the subway"
    assert not any(name.endswith(".1") for name in ds.images)
    assert any(".jpg.1" in note for note in ds.notes)
    _assert_partition(ds)  # no split lists: a seeded split


def test_kaggle_captions_use_split_lists_beside_them(tmp_path: Path):
    folder = _copy(KAGGLE, tmp_path / "k")
    for path in TOKEN.glob("Flickr_8k.*Images.txt"):
        _copy(path, folder / path.name)
    ds = load_dataset(str(folder))
    assert ds.format == "kaggle"
    assert {s: len(n) for s, n in ds.splits.items()} == {"train": 10, "val": 4, "test": 4}


def test_partial_split_lists_are_an_error(tmp_path: Path):
    folder = _copy(TOKEN, tmp_path / "t")
    (folder / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(CapcliError, match="devImages"):
        load_dataset(str(folder))


def test_karpathy_splits_with_restval_in_train():
    ds = load_dataset(str(DATA / "karpathy"))
    assert ds.format == "karpathy" and ds.name == "karpathy"
    assert ds.splits == {"train": ["a.jpg", "b.jpg", "e.jpg"], "val": ["c.jpg"], "test": ["d.jpg", "f.jpg"]}
    # raw preferred; tokens joined when there is no raw.
    assert ds.captions["a.jpg"] == ["A dog runs on the grass .", "A brown dog running ."]
    assert ds.captions["c.jpg"] == ["A man rides a bike .", "a cyclist on a road"]


def test_karpathy_filepath_and_image_folder(tmp_path: Path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "val2014" / "x.jpg")
    entries = [
        {"filepath": "val2014", "filename": f"{n}.jpg", "split": s, "sentences": [{"raw": f"image {n}"}]}
        for n, s in (("x", "train"), ("y", "val"), ("z", "test"))
    ]
    (root / "karpathy").mkdir()
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    ds = load_dataset(str(root / "karpathy" / "dataset_coco.json"))
    assert ds.images == ["val2014/x.jpg", "val2014/y.jpg", "val2014/z.jpg"]
    assert ds.images_dir == root
    assert ds.image_path("val2014/x.jpg").is_file()


def test_coco_captions(tmp_path: Path):
    root = _copy(DATA / "coco", tmp_path / "coco")
    (root / "val2014").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val2014" / "COCO_val2014_000000000042.jpg")
    ds = load_dataset(str(root / "annotations" / "captions_val2014.json"))
    assert ds.format == "coco" and ds.name == "captions_val2014"
    assert len(ds.images) == 5 and sum(len(c) for c in ds.captions.values()) == 6
    assert ds.captions["COCO_val2014_000000000042.jpg"][1] == "A red motorcycle, parked on a street."
    assert any("image_id" in note for note in ds.notes)
    assert ds.images_dir == root / "val2014"
    _assert_partition(ds)


def test_flickr30k_results_csv_nested_and_malformed_lines(tmp_path: Path):
    ds = load_dataset(str(DATA / "flickr30k"))  # results.csv is one folder down, as on Kaggle
    assert ds.format == "flickr30k_csv" and ds.name == "flickr30k"
    assert ds.captions["1000092795.jpg"][1] == "Two young , White males are outside near many bushes ."
    # "2199200615.jpg| 4 A dog runs ..." (one pipe missing) is recovered; a line without pipes is skipped.
    assert ds.captions["2199200615.jpg"] == [
        "A dog runs through the grass .",
        "A dog runs across the grass .",
    ]
    assert ds.captions["1001465944.jpg"] == ["A man and woman | holding hands walk down a street ."]
    assert any("malformed" in note and "line 11" in note for note in ds.notes)
    assert len(ds.images) == 6


def test_flickr30k_finds_the_nested_image_folder(tmp_path: Path):
    root = _copy(DATA / "flickr30k", tmp_path / "f30k")
    images = root / "flickr30k_images" / "flickr30k_images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "1000092795.jpg")
    assert load_dataset(str(root)).images_dir == images


# ---------------------------------------------------------------- detection and --images


@pytest.mark.parametrize(
    ("src", "new_name", "fmt"),
    [
        (KAGGLE / "captions.txt", "anything.csv", "kaggle"),
        (TOKEN / "Flickr8k.token.txt", "tokens.txt", "flickr8k_token"),
        (DATA / "karpathy" / "dataset_flickr8k.json", "splits.json", "karpathy"),
        (DATA / "coco" / "annotations" / "captions_val2014.json", "ann.json", "coco"),
        (DATA / "flickr30k" / "flickr30k_images" / "results.csv", "f30k.txt", "flickr30k_csv"),
    ],
)
def test_format_detected_from_content(tmp_path: Path, src: Path, new_name: str, fmt: str):
    assert load_dataset(str(_copy(src, tmp_path / new_name))).format == fmt


def test_images_override(tmp_path: Path):
    elsewhere = tmp_path / "pictures"
    elsewhere.mkdir()
    ds = load_dataset(KAGGLE / "captions.txt", images=elsewhere)
    assert ds.images_dir == elsewhere
    assert ds.image_path("x.jpg") == elsewhere / "x.jpg"
    with pytest.raises(CapcliError, match="no such images folder"):
        load_dataset(str(KAGGLE), images=tmp_path / "nope")


def test_named_dataset_not_downloaded(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    with pytest.raises(CapcliError, match="capcli data download flickr8k"):
        load_dataset("flickr8k")


def test_named_dataset_from_kagglehub_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    base = tmp_path / "datasets" / "adityajn105" / "flickr8k"
    _copy(KAGGLE, base / "versions" / "1")
    (base / "1.complete").touch()
    ds = load_dataset("flickr8k")
    assert ds.name == "flickr8k" and ds.format == "kaggle" and len(ds.images) == 19


# ---------------------------------------------------------------- errors


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("captions.txt", "", "empty file"),
        ("captions.txt", "image,caption\n", "no captions"),
        ("weird.txt", "hello world\n", "unknown annotation format"),
        ("dataset_x.json", "{bad json", "malformed JSON"),
        ("dataset_x.json", '{"images": [{"filename": "a.jpg", "split": "dev"}]}', "unknown split"),
        ("dataset_x.json", '{"pictures": []}', "list 'images'"),
        ("captions_x.json", '{"images": [{"id": 1}], "annotations": []}', "file_name"),
        ("results.txt", "image_name| comment_number| comment\nno pipes here\n", "no captions"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path: Path, name: str, text: str, message: str):
    with pytest.raises(CapcliError, match=message) as info:
        load_dataset(str(_write(tmp_path / name, text)))
    assert "\n" not in str(info.value)


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"image,caption\na.jpg,caf\xe9\n")
    with pytest.raises(CapcliError, match="not UTF-8"):
        load_dataset(str(path))


def test_missing_path_and_empty_folder(tmp_path: Path):
    with pytest.raises(CapcliError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nothing"))
    with pytest.raises(CapcliError, match="no annotation file"):
        load_dataset(str(tmp_path))


def test_several_annotation_files_are_ambiguous(tmp_path: Path):
    folder = tmp_path / "two"
    _copy(DATA / "karpathy" / "dataset_flickr8k.json", folder / "dataset_flickr8k.json")
    _copy(DATA / "karpathy" / "dataset_flickr8k.json", folder / "dataset_flickr30k.json")
    with pytest.raises(CapcliError, match="several annotation files"):
        load_dataset(str(folder))


def test_image_names_outside_the_folder_are_left_out(tmp_path: Path):
    text = "image,caption\n../../etc/passwd,a caption\n/abs.jpg,another\nok.jpg,fine\n"
    ds = load_dataset(str(_write(tmp_path / "captions.txt", text)), val_fraction=0, test_fraction=0)
    assert ds.images == ["ok.jpg"]
    assert any("outside" in note for note in ds.notes)


# ---------------------------------------------------------------- seeded splits and fingerprint


def _many_images(tmp_path: Path, n: int = 200) -> Path:
    rows = "".join(f"img{i:03d}.jpg,caption {j} of image {i}\n" for i in range(n) for j in range(3))
    return _write(tmp_path / "captions.txt", "image,caption\n" + rows)


def test_seeded_split_is_deterministic_disjoint_and_sized(tmp_path: Path):
    path = _many_images(tmp_path)
    a, b = load_dataset(str(path), seed=7), load_dataset(str(path), seed=7)
    assert a.splits == b.splits
    assert load_dataset(str(path), seed=8).splits != a.splits
    assert {s: len(n) for s, n in a.splits.items()} == {"train": 160, "val": 20, "test": 20}
    _assert_partition(a)
    custom = load_dataset(str(path), seed=7, val_fraction=0.25, test_fraction=0.05)
    assert {s: len(n) for s, n in custom.splits.items()} == {"train": 140, "val": 50, "test": 10}


def test_seeded_split_gives_small_sets_a_val_and_test_image(tmp_path: Path):
    ds = load_dataset(str(_many_images(tmp_path, n=4)))
    assert {s: len(n) for s, n in ds.splits.items()} == {"train": 2, "val": 1, "test": 1}
    with pytest.raises(CapcliError, match="too few"):
        load_dataset(str(_many_images(tmp_path / "two", n=2)))


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions(val: float, test: float):
    with pytest.raises(CapcliError, match="fraction"):
        load_dataset(str(KAGGLE), val_fraction=val, test_fraction=test)


def test_fingerprint_is_stable_and_tracks_captions(tmp_path: Path):
    path = _many_images(tmp_path, n=10)
    first = load_dataset(str(path))
    assert first.fingerprint() == load_dataset(str(path), seed=3).fingerprint()
    assert len(first.fingerprint()) == 16 and int(first.fingerprint(), 16) >= 0
    path.write_text(path.read_text().replace("caption 0 of image 3", "a changed caption"))
    assert load_dataset(str(path)).fingerprint() != first.fingerprint()


# ---------------------------------------------------------------- dataset_info


def test_dataset_info_counts_missing_and_unreadable(tmp_path: Path):
    folder = _copy(KAGGLE, tmp_path / "k")
    broken = "218342358_1755a9cce1.jpg"
    (folder / "Images" / broken).write_bytes(b"not a jpeg at all")
    ds = load_dataset(str(folder))
    assert broken in ds.captions
    info = dataset_info(ds, threshold=2)
    assert info["images"] == 19 and info["captions"] == 95
    assert sum(s["images"] for s in info["splits"].values()) == 19
    assert sum(s["captions"] for s in info["splits"].values()) == 95
    assert info["unreadable_images"] == [broken]
    assert len(info["missing_images"]) == 16 and broken not in info["missing_images"]
    assert info["vocab_size"] > 4 and info["vocab_threshold"] == 2
    words = info["caption_words"]
    assert words["min"] <= words["mean"] <= words["p95"] <= words["max"]
    json.dumps(info)  # JSON-ready
    quick = dataset_info(ds, check_images=False)
    assert quick["unreadable_images"] == [] and len(quick["missing_images"]) == 16


# --- issue 9, item 11: a stray quote in captions.txt is reported with its line, rows are not merged -----


def test_item11_stray_quote_is_reported_and_does_not_merge_rows(tmp_path: Path):
    folder = tmp_path / "kaggle"
    (folder / "Images").mkdir(parents=True)
    (folder / "captions.txt").write_text(
        "image,caption\n"
        "a.jpg,A dog runs .\n"
        'a.jpg,"A dog, brown, runs on grass .\n'  # line 3: the quote never closes
        "b.jpg,A cat sleeps .\n"
        'b.jpg,"A cat, grey, on a sofa ."\n'  # a properly quoted caption with commas
        "c.jpg,A bird flies .\n",
        encoding="utf-8",
    )
    ds = load_dataset(str(folder))
    assert set(ds.captions) == {"a.jpg", "b.jpg", "c.jpg"}
    assert ds.captions["a.jpg"] == ["A dog runs .", "A dog, brown, runs on grass ."]
    assert ds.captions["b.jpg"] == ["A cat sleeps .", "A cat, grey, on a sofa ."]
    notes = [note for note in ds.notes if "unbalanced quote" in note]
    assert len(notes) == 1 and "captions.txt" in notes[0] and "line(s) 3;" in notes[0]


def test_item11_stray_quote_note_is_shown_by_data_info(tmp_path: Path):
    from typer.testing import CliRunner

    from capcli.cli import app

    folder = tmp_path / "kaggle"
    (folder / "Images").mkdir(parents=True)
    rows = "".join(f"img{i}.jpg,caption number {i}\n" for i in range(12))
    (folder / "captions.txt").write_text('image,caption\n' + rows + 'img3.jpg,"oops\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "info", str(folder), "--no-check-images"])
    assert result.exit_code == 0, result.output
    assert "unbalanced quote" in result.stdout and "line(s) 14;" in result.stdout
