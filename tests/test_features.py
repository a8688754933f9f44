import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_backbone import tiny

from capcli import features
from capcli.data.readers import load_dataset

TESTS = Path(__file__).parent


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_extract_caches_float16_rows_and_second_run_is_a_no_op(small_synthetic, fresh_cache, monkeypatch):
    ds = load_dataset(str(small_synthetic))
    cache = features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", show_progress=False)
    assert cache.complete and cache.features.dtype == np.float16
    assert cache.features.shape == (len(ds.images), 8) and not cache.failed
    assert np.abs(np.asarray(cache.features)).sum() > 0

    def must_not_build(*args, **kwargs):
        raise AssertionError("a complete cache must not be recomputed")

    monkeypatch.setattr(type(tiny), "build", must_not_build)
    again = features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", show_progress=False)
    assert np.array_equal(np.asarray(again.features), np.asarray(cache.features))


def test_rows_match_single_image_forward(small_synthetic, fresh_cache):
    import torch

    from capcli.images import load_input

    ds = load_dataset(str(small_synthetic))
    cache = features.extract(tiny, ds, "none", batch_size=7, workers=2, device="cpu", show_progress=False)
    model = tiny.build("none")
    name = ds.images[5]
    with torch.inference_mode():
        ref = model(torch.from_numpy(load_input(ds.image_path(name), tiny.preprocessing))[None])[0].numpy()
    row = cache.row_index()[name]
    assert np.allclose(cache.features[row].astype(np.float32), ref, atol=1e-2)


def test_stopped_run_resumes_without_redoing_batches(small_synthetic, fresh_cache, monkeypatch):
    ds = load_dataset(str(small_synthetic))
    partial = features.extract(tiny, ds, "none", batch_size=10, workers=0, device="cpu",
                               show_progress=False, stop_after_batches=3)
    assert partial.done.sum() == 30 and features.open_cache(tiny, "none", ds) is None
    calls = []
    real_build = type(tiny).build

    def counting_build(self, weights):
        model = real_build(self, weights)
        model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        return model

    monkeypatch.setattr(type(tiny), "build", counting_build)
    done = features.extract(tiny, ds, "none", batch_size=10, workers=0, device="cpu", show_progress=False)
    assert done.complete and sum(calls) == len(ds.images) - 30


def test_kill_9_mid_extraction_then_resume_equals_uninterrupted(small_synthetic, tmp_path, monkeypatch):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from capcli import features
        from capcli.data.readers import load_dataset
        from tiny_backbone import tiny
        ds = load_dataset({str(small_synthetic)!r})
        features.extract(tiny, ds, "none", batch_size=4, workers=0, device="cpu", show_progress=False)
    """)
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "killed"))
    ds = load_dataset(str(small_synthetic))
    done_file = features.cache_dir(tiny, "none", ds) / "done.npy"
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TINY_BACKBONE_DELAY": "0.2"})
    deadline = time.time() + 60
    while time.time() < deadline and not (done_file.exists() and np.load(done_file).sum() >= 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(np.load(done_file).sum())
    assert 0 < killed_at < len(ds.images), "the run must be killed mid-way"
    assert features.open_cache(tiny, "none", ds) is None  # an unfinished cache never loads
    resumed = features.extract(tiny, ds, "none", batch_size=4, workers=0, device="cpu", show_progress=False)

    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "clean"))
    clean = features.extract(tiny, ds, "none", batch_size=4, workers=0, device="cpu", show_progress=False)
    assert resumed.images == clean.images
    assert np.array_equal(np.asarray(resumed.features), np.asarray(clean.features))


def test_unreadable_images_are_listed_and_skipped(small_synthetic, tmp_path, fresh_cache):
    copy = tmp_path / "ds"
    shutil.copytree(small_synthetic, copy)
    ds = load_dataset(str(copy))
    truncated, not_image, missing = ds.images[0], ds.images[1], ds.images[2]
    data = ds.image_path(truncated).read_bytes()
    ds.image_path(truncated).write_bytes(data[: len(data) // 3])
    ds.image_path(not_image).write_text("this is not an image")
    ds.image_path(missing).unlink()
    cache = features.extract(tiny, ds, "none", batch_size=8, workers=0, device="cpu", show_progress=False)
    assert cache.complete
    assert set(cache.failed) == {truncated, not_image, missing}
    assert "not an image" in cache.failed[not_image] and "no such file" in cache.failed[missing]


def test_cache_key_changes_with_weights_and_preprocessing(small_synthetic, tmp_path):
    from dataclasses import replace

    from capcli.backbone import Preprocessing

    ds = load_dataset(str(small_synthetic))
    other_prep = replace(tiny, preprocessing=Preprocessing(input_size=32, resize=40))
    weights_file = tmp_path / "w.pt"
    weights_file.write_bytes(b"x")
    keys = {features.cache_dir(tiny, "none", ds), features.cache_dir(other_prep, "none", ds),
            features.cache_dir(tiny, str(weights_file), ds)}
    assert len(keys) == 3


# --- issue 9, item 1: the cache is keyed by the image folder and validated against each file ----------


def _forward_one(path):
    import torch

    from capcli.images import load_input

    with torch.inference_mode():
        x = torch.from_numpy(load_input(path, tiny.preprocessing))[None]
        return tiny.build("none")(x)[0].numpy()


def _counting_build(monkeypatch) -> list[int]:
    """Patch the tiny backbone so every forward records its batch size."""
    calls: list[int] = []
    real_build = type(tiny).build

    def counting_build(self, weights):
        model = real_build(self, weights)
        model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        return model

    monkeypatch.setattr(type(tiny), "build", counting_build)
    return calls


def _repaint(path, colour, mtime_ns=None):
    from PIL import Image

    Image.new("RGB", (40, 40), colour).save(path)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_item1_other_image_folder_with_the_same_names_is_extracted_not_reused(small_synthetic, tmp_path,
                                                                               fresh_cache):
    other = tmp_path / "other"
    other.mkdir()
    ds = load_dataset(str(small_synthetic))
    for i, name in enumerate(ds.images):
        _repaint(other / name, (i % 256, 255 - i % 256, 40))
    first = features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    ds_other = load_dataset(str(small_synthetic), images=str(other))
    second = features.extract(tiny, ds_other, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    assert second.path != first.path and second.images_dir == str(other.resolve())
    name = ds.images[7]
    row = second.row_index()[name]
    assert np.allclose(second.features[row].astype(np.float32), _forward_one(other / name), atol=1e-2)
    assert not np.allclose(second.features[row], first.features[row], atol=1e-2)


def test_item1_changed_file_is_re_extracted_and_others_are_not(small_synthetic, tmp_path, fresh_cache,
                                                               monkeypatch):
    copy = tmp_path / "ds"
    shutil.copytree(small_synthetic, copy)
    ds = load_dataset(str(copy))
    first = features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    name = ds.images[3]
    old_row = np.array(first.features[first.row_index()[name]])
    stat = ds.image_path(name).stat()
    _repaint(ds.image_path(name), (250, 0, 0), mtime_ns=stat.st_mtime_ns + 10**9)
    calls = _counting_build(monkeypatch)
    again = features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    assert calls == [1], "only the changed image is extracted again"
    row = again.features[again.row_index()[name]].astype(np.float32)
    assert np.allclose(row, _forward_one(ds.image_path(name)), atol=1e-2)
    assert not np.allclose(row, old_row, atol=1e-2)


def test_item1_same_size_and_new_mtime_alone_is_enough_to_re_extract(small_synthetic, tmp_path, fresh_cache,
                                                                      monkeypatch):
    copy = tmp_path / "ds"
    shutil.copytree(small_synthetic, copy)
    ds = load_dataset(str(copy))
    features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    path = ds.image_path(ds.images[0])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    calls = _counting_build(monkeypatch)
    features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    assert calls == [1]


def test_item1_image_missing_at_extraction_is_retried_when_it_appears(small_synthetic, tmp_path, fresh_cache):
    copy = tmp_path / "ds"
    shutil.copytree(small_synthetic, copy)
    ds = load_dataset(str(copy))
    name = ds.images[5]
    kept = tmp_path / "kept.png"
    shutil.move(ds.image_path(name), kept)
    first = features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    assert first.complete and name in first.failed
    shutil.move(kept, ds.image_path(name))
    again = features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    assert name not in again.failed and not again.failed
    row = again.features[again.row_index()[name]].astype(np.float32)
    assert np.allclose(row, _forward_one(ds.image_path(name)), atol=1e-2)


def test_item1_unchanged_rerun_only_stats_files_even_with_a_failure(small_synthetic, tmp_path, fresh_cache,
                                                                     monkeypatch):
    copy = tmp_path / "ds"
    shutil.copytree(small_synthetic, copy)
    ds = load_dataset(str(copy))
    ds.image_path(ds.images[0]).unlink()
    first = features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", show_progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}

    def must_not_build(*args, **kwargs):
        raise AssertionError("nothing to extract: the model must not be built")

    monkeypatch.setattr(type(tiny), "build", must_not_build)
    again = features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", show_progress=False)
    assert list(again.failed) == [ds.images[0]]  # retried, still missing, still listed
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == stamps  # nothing rewritten


def test_item1_split_without_usable_captions_says_why_and_what_to_do(small_synthetic, tmp_path, fresh_cache):
    from capcli.data.text import build_vocabulary
    from capcli.errors import CapcliError
    from capcli.train import encode_split

    copy = tmp_path / "ds"
    shutil.copytree(small_synthetic, copy)
    ds = load_dataset(str(copy))
    for name in ds.splits["val"]:
        ds.image_path(name).unlink()
    cache = features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    with pytest.raises(CapcliError) as info:
        encode_split(ds, "val", build_vocabulary(ds, 2), cache, 20)
    message = str(info.value)
    assert f"none of its {len(ds.splits['val'])} images could be read" in message
    assert "no such file" in message and str(ds.images_dir) in message
    assert "--images" in message and "retried" in message and "\n" not in message


# --- issue 9, item 4: an image that would expand in memory is one failed image, on every run -------


def test_item4_bomb_inside_a_dataset_is_one_failed_image(small_synthetic, tmp_path, fresh_cache):
    from PIL import Image

    copy = tmp_path / "ds"
    shutil.copytree(small_synthetic, copy)
    ds = load_dataset(str(copy))
    bomb = ds.images[4]
    Image.new("L", (2_000_000, 1)).save(ds.image_path(bomb), format="PNG")
    for _ in range(2):  # the rerun retries it and still completes
        cache = features.extract(tiny, ds, "none", batch_size=8, workers=0, device="cpu", show_progress=False)
        assert cache.complete and list(cache.failed) == [bomb]
        assert "too elongated" in cache.failed[bomb]
