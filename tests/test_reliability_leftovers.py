"""Nothing left behind by failures (issue 19 item 2): a bad --weights file costs no feature-cache preallocation,
and a build that fails after the cache was started gives its space back."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_backbone import tiny

from capcli.backbone import load_state_dict_file
from capcli.data.readers import load_dataset
from capcli.errors import CapcliError
from capcli.features import cache as feature_cache
from capcli.features import extraction as features


def _build_with_weights_file(weights: str):
    from tiny_backbone import _build

    model = _build("none")
    if weights not in ("imagenet", "none"):
        load_state_dict_file(model, weights, "strict")  # as every bundled plugin does
    return model


STRICT = dataclasses.replace(tiny, name="strict", builder=_build_with_weights_file)


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(root):
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_bad_weights_file_is_refused_before_the_cache_is_preallocated(small_synthetic, fresh_cache, tmp_path,
                                                                      monkeypatch):
    bogus = tmp_path / "passwd"
    bogus.write_text("root:x:0:0:root:/root:/bin/bash\n")
    ds = load_dataset(str(small_synthetic))
    created = []
    real = feature_cache._create_feature_file
    monkeypatch.setattr(feature_cache, "_create_feature_file", lambda *a: created.append(a) or real(*a))
    with pytest.raises(CapcliError, match="cannot read weights file"):
        features.extract(STRICT, ds, str(bogus), batch_size=16, workers=0, device="cpu", engine="torch",
                         show_progress=False)
    assert not created, "the feature file was preallocated before the weights were read"
    assert "features.npy" not in _files(fresh_cache)


def test_a_failure_before_any_row_removes_the_preallocation(small_synthetic, fresh_cache, monkeypatch):
    ds = load_dataset(str(small_synthetic))

    def fails(*_args, **_kwargs):
        raise CapcliError("the backbone broke")

    monkeypatch.setattr(features, "_extract_rows", fails)
    with pytest.raises(CapcliError, match="the backbone broke"):
        features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", engine="torch",
                         show_progress=False)
    assert "features.npy" not in _files(fresh_cache), _files(fresh_cache)
    monkeypatch.undo()
    monkeypatch.setenv("CAPCLI_CACHE", str(fresh_cache))
    cache = features.extract(tiny, ds, "none", batch_size=16, workers=0, device="cpu", engine="torch",
                             show_progress=False)
    assert cache.complete


def test_features_counts_only_the_images_it_extracted(small_synthetic, fresh_cache, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from capcli.cli import app

    data = tmp_path / "data"
    shutil.copytree(small_synthetic, data)
    broken = sorted((data / "Images").iterdir())[:2]
    for image in broken:
        image.write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["features", "--backbone", "efficientnet_lite0", "--dataset", str(data),
                                      "--weights", "none", "--engine", "torch", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "118 of 120 images, 1280-d float16 features" in result.stdout
    assert "2 images could not be read and were skipped" in result.stderr
