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

from capcli.data.readers import load_dataset
from capcli.features import cache as feature_cache
from capcli.features import extraction as features

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
    assert partial.done.sum() == 30 and feature_cache.open_cache(tiny, "none", ds) is None
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
        from capcli.features import extraction as features
        from capcli.features import cache as feature_cache
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
    assert feature_cache.open_cache(tiny, "none", ds) is None  # an unfinished cache never loads
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
    from capcli.train.captions import encode_split

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


# --- issue 9, item 10: a full disk during extraction is one line, never a SIGBUS, and corrupts nothing ----

EXTRACT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from capcli.features import extraction as features
from capcli.features import cache as feature_cache
from capcli.data.readers import load_dataset
from capcli.errors import CapcliError
import tiny_backbone
try:
    features.extract(getattr(tiny_backbone, {backbone!r}), load_dataset({dataset!r}), "none", batch_size=8,
                     workers=0, device="cpu", show_progress=False)
except CapcliError as exc:
    print(f"error: {{exc}}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and the right to mount, as in CI; skips with the reason otherwise)."""
    from mounts import small_disk

    with small_disk(tmp_path / "disk", 1024) as disk:
        yield disk


def _extract_in_subprocess(backbone: str, dataset, cache) -> subprocess.CompletedProcess:
    script = EXTRACT_SCRIPT.format(tests=str(TESTS), backbone=backbone, dataset=str(dataset))
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, "CAPCLI_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=120)


def test_item10_feature_file_that_does_not_fit_is_one_line_and_keeps_other_caches(small_synthetic, small_disk,
                                                                                    monkeypatch):
    from tiny_backbone import wide

    monkeypatch.setenv("CAPCLI_CACHE", str(small_disk))
    ds = load_dataset(str(small_synthetic))
    small = features.extract(tiny, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    before = np.array(small.features)
    # 120 images x 8192 x 2 bytes = 1.9 MiB: more than the 1 MiB disk holds.
    with pytest.raises(features.CapcliError) as info:
        features.extract(wide, ds, "none", batch_size=32, workers=0, device="cpu", show_progress=False)
    message = str(info.value)
    assert "No space left on device" in message and "CAPCLI_CACHE" in message and "\n" not in message
    wide_dir = features.cache_dir(wide, "none", ds)
    assert not (wide_dir / "features.npy").exists() and not (wide_dir / "meta.json").exists()
    assert np.array_equal(np.asarray(feature_cache.open_cache(tiny, "none", ds).features), before)


def test_item10_disk_full_mid_run_is_one_line_not_sigbus_and_resumes(small_synthetic, small_disk, tmp_path,
                                                                      monkeypatch):
    from mounts import fill
    from tiny_backbone import wide

    few = tmp_path / "few"  # 50 images: the feature file (0.78 MiB) fits the 1 MiB disk
    shutil.copytree(small_synthetic, few)
    lines = (few / "captions.txt").read_text().splitlines()
    (few / "captions.txt").write_text("\n".join(lines[: 1 + 50 * 5]) + "\n")
    ds = load_dataset(str(few))
    monkeypatch.setenv("CAPCLI_CACHE", str(small_disk))
    partial = features.extract(wide, ds, "none", batch_size=8, workers=0, device="cpu", show_progress=False,
                               stop_after_batches=2)
    assert partial.done.sum() == 16
    fill(small_disk, leave_kb=0)  # another program fills the disk
    run = _extract_in_subprocess("wide", few, small_disk)
    assert run.returncode == 1, f"rc {run.returncode} (-7 is SIGBUS): {run.stderr[-2000:]}"
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write") and str(small_disk) in errors[0]
    assert "No space left on device" in errors[0] and "rerun to resume" in errors[0]
    (small_disk / "filler").unlink()
    resumed = features.extract(wide, ds, "none", batch_size=8, workers=0, device="cpu", show_progress=False)
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "clean"))
    clean = features.extract(wide, ds, "none", batch_size=8, workers=0, device="cpu", show_progress=False)
    assert resumed.complete and np.array_equal(np.asarray(resumed.features), np.asarray(clean.features))


# --- issue 9, item 11: Ctrl-C during `capcli features` prints one "interrupted" line, no worker tracebacks --

CLI_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import capcli.registry
import tiny_backbone
capcli.registry.get_backbone = lambda name: tiny_backbone.tiny
from capcli.cli.app import main
sys.argv = ["capcli", "features", "--backbone", "tiny", "--weights", "none", "--dataset", {dataset!r},
            "--workers", "2", "--batch-size", "4", "--device", "cpu", "--engine", "torch"]  # its forward sleeps
main()
"""


class _SigintDisposition:
    """A dataset whose items say how the process loading them handles SIGINT."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT as a foreground terminal delivers it, also when the tests were started with it ignored (nohup, &)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # for a child's preexec_fn: Python's own handler
    signal.signal(signal.SIGINT, before)


def test_item11_loader_workers_ignore_ctrl_c(ctrl_c_as_in_a_terminal):
    loader = features.image_loader(_SigintDisposition(), batch_size=1, workers=2, device="cpu",
                                   collate_fn=lambda items: items[0])
    assert list(loader) == [1, 1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the main process keeps Ctrl-C


def test_item11_ctrl_c_during_features_is_one_line_and_resumes(small_synthetic, tmp_path, monkeypatch,
                                                             ctrl_c_as_in_a_terminal):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    ds = load_dataset(str(small_synthetic))
    # The synthetic images are square: `capcli features` frames them with resize mode squash (auto).
    done_file = features.cache_dir(tiny.with_resize_mode("squash"), "none", ds) / "done.npy"
    script = CLI_SCRIPT.format(tests=str(TESTS), dataset=str(small_synthetic))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TINY_BACKBONE_DELAY": "0.2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    deadline = time.time() + 60
    while time.time() < deadline and not (done_file.exists() and np.load(done_file).sum() >= 8):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    messages = [line for line in stderr.splitlines() if line.strip() and not line.lstrip().startswith("features")]
    assert len(messages) == 1 and messages[0].startswith("interrupted"), stderr[-3000:]
    killed_at = int(np.load(done_file).sum())
    assert 0 < killed_at < len(ds.images)
    resumed = features.extract(tiny.with_resize_mode("squash"), ds, "none", batch_size=4, workers=0, device="cpu",
                               show_progress=False)
    assert resumed.complete and not resumed.failed


def test_bad_extraction_options_are_one_error_line(small_synthetic):
    from typer.testing import CliRunner

    from capcli.cli import app

    for args in (["--batch-size", "0"], ["--workers", "-1"]):
        result = CliRunner().invoke(app, ["features", "--backbone", "efficientnet_lite0", "--dataset",
                                          str(small_synthetic), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {args[0]} must be"), result.stderr


def test_features_beyond_float16_are_saturated_with_one_note_and_nan_is_an_error(capsys):
    import numpy as np

    from capcli.errors import CapcliError
    from capcli.features.extraction import F16_MAX, to_float16

    warned: list = []
    big = np.array([[1e6, -1e6, 0.5]], np.float32)
    out = to_float16(big, "resnet152", "none", warned)
    assert out.dtype == np.float16 and np.isfinite(out).all()
    assert out.tolist() == [[F16_MAX, -F16_MAX, 0.5]]
    to_float16(big, "resnet152", "none", warned)
    assert capsys.readouterr().err.count("exceed float16's range") == 1
    with pytest.raises(CapcliError, match="non-finite features"):
        to_float16(np.array([[np.nan]], np.float32), "resnet152", "none", [])
