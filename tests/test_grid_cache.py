"""The grid feature cache: [N, P, C] float16 rows, keyed apart from pooled ones, resumable, read row by row."""

from __future__ import annotations

import json
import os
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
from capcli.train.feature_rows import RowReader

TESTS = Path(__file__).parent


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_grid_rows_are_the_backbones_grid_flattened_row_major(small_synthetic, fresh_cache):
    import torch

    from capcli.images import load_input

    ds = load_dataset(str(small_synthetic))
    cache = features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", show_progress=False,
                             output="grid")
    assert cache.complete and cache.features.dtype == np.float16
    assert cache.features.shape == (len(ds.images), 15 * 15, 8)
    assert cache.meta["grid"] == {"channels": 8, "height": 15, "width": 15}
    name = ds.images[3]
    with torch.inference_mode():
        grid = tiny.build_grid("none")(torch.from_numpy(load_input(ds.image_path(name), tiny.preprocessing))[None])
    row = np.asarray(cache.features[cache.row_index()[name]], dtype=np.float32)
    assert np.allclose(row[2 * 15 + 7], grid[0, :, 2, 7].numpy(), atol=1e-2)  # position y=2, x=7
    pooled = features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", show_progress=False)
    assert pooled.path != cache.path and pooled.features.shape == (len(ds.images), 8)
    # Same weights: the pooled features are the grid's mean (the tiny backbone pools by averaging).
    assert np.allclose(row.mean(0), np.asarray(pooled.features[cache.row_index()[name]], np.float32), atol=1e-2)


def test_grid_cache_key_names_the_grid(small_synthetic):
    from dataclasses import replace

    from capcli.backbone import Grid

    ds = load_dataset(str(small_synthetic))
    other = replace(tiny, grid=Grid(8, 14, 14))
    dirs = {features.cache_dir(tiny, "none", ds), features.cache_dir(tiny, "none", ds, "grid"),
            features.cache_dir(other, "none", ds, "grid")}
    assert len(dirs) == 3
    assert features.cache_dir(tiny, "none", ds) == features.cache_dir(other, "none", ds)  # pooled keys unchanged


def test_grid_of_a_backbone_without_one_is_a_clear_error(small_synthetic, fresh_cache):
    from dataclasses import replace

    from capcli.errors import CapcliError

    ds = load_dataset(str(small_synthetic))
    with pytest.raises(CapcliError, match="backbone 'flat' declares no feature grid"):
        features.extract(replace(tiny, name="flat", grid=None, grid_builder=None), ds, "none", workers=0,
                         device="cpu", show_progress=False, output="grid")


def test_kill_9_mid_grid_extraction_then_resume_equals_uninterrupted(small_synthetic, tmp_path, monkeypatch):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from capcli.features import extraction as features
        from capcli.features import cache as feature_cache
        from capcli.data.readers import load_dataset
        from tiny_backbone import tiny
        ds = load_dataset({str(small_synthetic)!r})
        features.extract(tiny, ds, "none", batch_size=4, workers=0, device="cpu", show_progress=False,
                         output="grid")
    """)
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "killed"))
    ds = load_dataset(str(small_synthetic))
    done_file = features.cache_dir(tiny, "none", ds, "grid") / "done.npy"
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TINY_BACKBONE_DELAY": "0.2"})
    deadline = time.time() + 60
    while time.time() < deadline and not (done_file.exists() and np.load(done_file).sum() >= 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(np.load(done_file).sum())
    assert 0 < killed_at < len(ds.images), "the run must be killed mid-way"
    assert feature_cache.open_cache(tiny, "none", ds, "grid") is None
    resumed = features.extract(tiny, ds, "none", batch_size=4, workers=0, device="cpu", show_progress=False,
                               output="grid")
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "clean"))
    clean = features.extract(tiny, ds, "none", batch_size=4, workers=0, device="cpu", show_progress=False,
                             output="grid")
    assert np.array_equal(np.asarray(resumed.features), np.asarray(clean.features))


def test_row_reader_reads_any_rows_without_mapping_the_file(tmp_path):
    data = np.random.default_rng(0).standard_normal((50, 6, 4)).astype(np.float16)
    np.save(tmp_path / "rows.npy", data)
    reader = RowReader(tmp_path / "rows.npy")
    assert len(reader) == 50 and reader.row_shape == (6, 4)
    rows = [7, 0, 49, 7]
    assert np.array_equal(reader.read(rows), data[rows])
    assert reader.read([]).shape == (0, 6, 4)
    with pytest.raises(IndexError):
        reader.read([50])
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert "rows.npy" not in maps.read_text()


def test_row_reader_refuses_a_truncated_file(tmp_path):
    from capcli.errors import CapcliError

    np.save(tmp_path / "rows.npy", np.zeros((10, 8), np.float16))
    path = tmp_path / "rows.npy"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CapcliError, match="truncated"):
        RowReader(path)


# --- training reads the grid cache batch by batch: resident memory stays far below the cache's size ------

_TRAIN_AND_MEASURE = """
import json, sys
import torch
import matplotlib.pyplot, pycocoevalcap.bleu.bleu, pycocoevalcap.cider.cider  # imported by train(): not data
from capcli.model.attention import AttentionConfig, AttentionDecoder
from capcli.train.config import TrainConfig
from capcli.train.loop import caption_loss, train

def status(field):  # bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

# Warm-up on a few random grids: torch's kernels, math libraries and optimizer code (Adam imports
# much of torch._dynamo) page in ~150 MB on first use. That is not data: paid before the baseline.
warm = AttentionDecoder(AttentionConfig(feature_dim=1280, vocab_size=9, embed_dim=16, hidden_dim=16,
                                        context_dim=16, attention_dim=16))
caption_loss(warm, {"grid": torch.randn(8, 49, 1280).half(), "rows": None}, torch.ones(8, 5, dtype=torch.long),
             0, 1.0)[0].backward()
torch.optim.Adam(warm.parameters()).step()
before = status("VmRSS")
train(TrainConfig(backbone="efficientnet_lite0", dataset=sys.argv[1], weights="none", out=sys.argv[2],
                  decoder="attention", epochs=1, batch_size=128, embed_dim=16, hidden_dim=16, context_dim=16,
                  attention_dim=16, threshold=1, val_sample=16, device="cpu", workers=0), show_progress=False)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def _captions_only_dataset(folder: Path, n: int) -> Path:
    """A Kaggle-layout dataset whose images are never opened (the test writes their grid cache itself).

    Five captions per image, as in Flickr8k and COCO.
    """
    (folder / "Images").mkdir(parents=True)
    words = ["red circle", "blue square", "green star", "yellow cross", "purple triangle"]
    lines = ["image,caption"] + [f"img{i:05d}.png,a {words[(i + j) % 5]} on a black background"
                                 for i in range(n) for j in range(5)]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    return folder


def _write_complete_grid_cache(ds, backbone) -> int:
    """A complete efficientnet_lite0 grid cache for `ds` (random rows): what extraction would leave."""
    path = features.cache_dir(backbone, "none", ds, "grid")
    state = feature_cache.start_cache(path, backbone, "none", ds, "grid")
    block = np.random.default_rng(0).standard_normal((256, *state.features.shape[1:])).astype(np.float16)
    for start in range(0, len(state.features), 256):
        stop = min(start + 256, len(state.features))
        state.features[start:stop] = block[: stop - start]
    state.features.flush()
    size = state.features.nbytes
    state.done[:] = True  # the images do not exist: their recorded stats (none) stay valid
    feature_cache._save_array(path / "done.npy", state.done)
    return size


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc")
def test_training_on_a_grid_cache_keeps_resident_memory_far_below_its_size(tmp_path, monkeypatch):
    from capcli.registry import get_backbone

    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ds = load_dataset(str(_captions_only_dataset(tmp_path / "data", 4000)))
    cache_bytes = _write_complete_grid_cache(ds, get_backbone("efficientnet_lite0"))
    assert cache_bytes > 500e6  # 4000 x 49 x 1280 float16
    proc = subprocess.run([sys.executable, "-c", _TRAIN_AND_MEASURE, str(tmp_path / "data"), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = memory["peak"] - memory["before"]
    # What does grow (batch buffers, allocator pools, metrics) depends on the batch, not on the cache:
    # ~80 MB here; loading the array, or indexing a memmap over an epoch, would add all 500 MB.
    assert grown < cache_bytes / 4, f"training grew resident memory by {grown / 1e6:.0f} MB for a " \
                                     f"{cache_bytes / 1e6:.0f} MB cache"
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["train_loss"] > 0
