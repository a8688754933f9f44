"""The synthetic dataset: determinism, captions true of the image, variety, atomic generation."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import threading
import time
from pathlib import Path

import pytest

from capcli.data import synthetic
from capcli.data.readers import load_dataset
from capcli.data.synthetic import (
    COLOURS,
    SHAPES,
    caption_is_correct,
    default_synthetic,
    generate,
    load_objects,
    named_pairs,
)
from capcli.errors import CapcliError
from capcli.images import load_rgb


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(root: Path) -> list[tuple[str, str]]:
    with open(root / "captions.txt", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "caption"]
    return [(image, caption) for image, caption in rows[1:]]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "set", n_images=60, seed=5)


def test_same_seed_same_bytes(small_set: Path, tmp_path: Path):
    again = generate(tmp_path / "again", n_images=60, seed=5)
    assert _digests(again) == _digests(small_set)
    other = generate(tmp_path / "other", n_images=60, seed=6)
    assert _digests(other) != _digests(small_set)


def test_threads_draw_the_same_bytes(small_set: Path, tmp_path: Path):
    drawn = generate(tmp_path / "threads", n_images=60, seed=5, workers=3)  # chunks of 50: one ends short
    assert _digests(drawn) == _digests(small_set)  # images, captions.txt and objects.json


def test_a_large_set_is_drawn_by_one_thread_per_core(monkeypatch):
    from capcli.data import synthetic

    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 4)
    assert [synthetic.generation_workers(n) for n in (60, 999, 1000, 5000, 10**6)] == [1, 1, 2, 4, 4]


def test_an_image_does_not_depend_on_the_set_size(small_set: Path, tmp_path: Path):
    fewer = generate(tmp_path / "fewer", n_images=10, seed=5)
    for name in (p.name for p in (fewer / "Images").iterdir()):
        assert (fewer / "Images" / name).read_bytes() == (small_set / "Images" / name).read_bytes()


def test_layout_reads_as_a_kaggle_dataset(small_set: Path):
    ds = load_dataset(str(small_set))
    assert ds.format == "kaggle" and ds.images_dir == small_set / "Images"
    assert len(ds.images) == 60 and all(len(c) == 5 for c in ds.captions.values())
    img = load_rgb(ds.image_path(ds.images[0]))
    assert img.size == (224, 224)


def test_pixels_carry_a_cameras_noise_around_the_drawn_colours(small_set: Path):
    # A model trained on perfectly flat images is thrown off by noise it never saw (int8 encoders, photos).
    import numpy as np

    meta = json.loads((small_set / "objects.json").read_text())
    for name in sorted(meta["images"])[:10]:
        pixels = np.asarray(load_rgb(small_set / "Images" / name), dtype=np.float32)
        corner = pixels[:12, :12].reshape(-1, 3)  # background: objects keep clear of the borders
        assert np.all(np.abs(corner.mean(axis=0) - np.median(corner, axis=0)) < 2)
        assert np.all((1.5 < corner.std(axis=0)) & (corner.std(axis=0) < 4.5)), corner.std(axis=0)


def test_every_caption_is_true_of_its_image(small_set: Path):
    objects = load_objects(small_set)
    rows = _rows(small_set)
    assert len(rows) == 60 * 5
    for image, caption in rows:
        assert caption_is_correct(caption, objects[image]), (image, caption, objects[image])
        assert set(named_pairs(caption)) <= {(o["colour"], o["shape"]) for o in objects[image]}


def test_largest_object_is_named_first(small_set: Path):
    objects = load_objects(small_set)
    for image, caption in _rows(small_set):
        largest = objects[image][0]
        assert all(o["size"] == "small" for o in objects[image][1:]) or largest["size"] == "large"
        assert named_pairs(caption)[0] == (largest["colour"], largest["shape"])


def test_objects_stay_clear_of_borders_and_of_each_other(small_set: Path):
    for scene in load_objects(small_set).values():
        assert 1 <= len(scene) <= 3
        assert len({(o["colour"], o["shape"]) for o in scene}) == len(scene)
        for o in scene:
            (x, y), r = o["centre"], o["radius"]
            assert 0.065 * 224 <= min(x - r, y - r) and max(x + r, y + r) <= 0.935 * 224
            assert o["colour"] in COLOURS and o["shape"] in SHAPES
        if len(scene) > 1:  # the main object dominates: large, the others small
            assert [o["size"] for o in scene] == ["large"] + ["small"] * (len(scene) - 1)
        for i, a in enumerate(scene):
            for b in scene[i + 1 :]:
                gap = ((a["centre"][0] - b["centre"][0]) ** 2 + (a["centre"][1] - b["centre"][1]) ** 2) ** 0.5
                assert gap > a["radius"] + b["radius"]


def test_captions_vary_in_wording(small_set: Path):
    words = "|".join((*COLOURS, *SHAPES, "small", "large", "white", "black", "gray", "one", "two", "three"))
    patterns = {re.sub(rf"\b({words})\b", "_", caption) for _, caption in _rows(small_set)}
    templates = {re.sub(r"(an? _ (_ )?_)(, an? _ (_ )?_)*( and an? _ (_ )?_)?", "X", p) for p in patterns}
    assert len(templates) >= 8
    for image in {image for image, _ in _rows(small_set)}:
        captions = [c for i, c in _rows(small_set) if i == image]
        assert len(set(captions)) == 5


@pytest.mark.parametrize(
    ("caption", "pairs"),
    [
        ("a big red circle and a blue square", [("red", "circle"), ("blue", "square")]),
        ("a red large circle", [("red", "circle")]),
        ("two red circles and green crosses", [("red", "circle"), ("green", "cross")]),
        ("a yellow star on a white background", [("yellow", "star")]),
        ("a white square", [("white", "square")]),
        ("a red and blue square", [("blue", "square")]),
        ("a red thing to the left of a square", []),
        ("", []),
    ],
)
def test_named_pairs(caption, pairs):
    assert named_pairs(caption) == pairs


def test_caption_is_correct():
    objects = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]
    assert caption_is_correct("a large red circle and a small blue square", objects)
    assert caption_is_correct("a blue square", objects)
    assert not caption_is_correct("a red square", objects)
    assert not caption_is_correct("a red circle and a green star", objects)
    assert not caption_is_correct("a shape on a white background", objects)


def test_load_objects_errors(tmp_path: Path):
    with pytest.raises(CapcliError, match="not a synthetic dataset"):
        load_objects(tmp_path)
    (tmp_path / "objects.json").write_text('{"format": "other"}')
    with pytest.raises(CapcliError, match="not a capcli synthetic"):
        load_objects(tmp_path)


def test_default_synthetic_is_made_once_in_the_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path))
    path = default_synthetic(n_images=12, seed=2)
    assert path == tmp_path / "datasets" / "synthetic-v3-s2-n12"
    stamp = (path / "objects.json").stat().st_mtime_ns
    assert default_synthetic(n_images=12, seed=2) == path
    assert (path / "objects.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == ["synthetic-v3-s2-n12"]


@pytest.mark.parametrize("threads", [1, 3])
def test_interrupted_generation_leaves_no_half_dataset(tmp_path: Path, monkeypatch, threads: int):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "generation_workers", lambda n: threads)

    def interrupt(done: int) -> None:
        if done == 55:  # in the second chunk of 50
            raise KeyboardInterrupt

    threads_before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        default_synthetic(n_images=600, seed=2, progress=interrupt)
    assert list((tmp_path / "datasets").iterdir()) == []
    assert threading.active_count() == threads_before  # the drawing threads stopped with the interruption


def test_build_replaces_an_earlier_set(tmp_path: Path):
    out = synthetic.build(tmp_path / "set", n_images=8, seed=1)
    synthetic.build(out, n_images=4, seed=1)
    assert len(list((out / "Images").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_load_dataset_synthetic_name(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULT_IMAGES", 30)  # the real default takes a few seconds
    ds = load_dataset("synthetic")
    assert ds.name == "synthetic" and ds.format == "kaggle" and len(ds.images) == 30
    assert ds.annotation == tmp_path / "datasets" / "synthetic-v3-s0-n30" / "captions.txt"
    assert len(load_objects(ds.annotation.parent)) == 30


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(CapcliError):
        generate(tmp_path / "none", n_images=0)
    with pytest.raises(CapcliError):
        generate(tmp_path / "tiny", n_images=1, size=8)


def test_generation_speed_sanity(tmp_path: Path, capsys):
    started = time.perf_counter()
    generate(tmp_path / "speed", n_images=200, seed=0)
    rate = 200 / (time.perf_counter() - started)
    with capsys.disabled():
        print(f"\nsynthetic generation: {rate:.0f} images/s")
