"""Shared fixtures: an isolated cache, a small synthetic dataset, a briefly trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every test writes caches below a throwaway folder, never into the user's ~/.cache.
os.environ.setdefault("CAPCLI_CACHE", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "capcli-test-cache"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("capcli-cache")
    old = os.environ.get("CAPCLI_CACHE")
    os.environ["CAPCLI_CACHE"] = str(cache)
    yield cache
    if old is not None:
        os.environ["CAPCLI_CACHE"] = old


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """120 synthetic images in the Kaggle layout (about a second to make)."""
    from capcli.data.synthetic import generate

    out = tmp_path_factory.mktemp("data") / "synthetic"
    generate(out, n_images=120, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_synthetic) -> Path:
    """A pooled decoder trained for 2 epochs on efficientnet_lite0 features of the small synthetic set."""
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(
        backbone="efficientnet_lite0", dataset=str(small_synthetic), weights="imagenet", out=str(out),
        epochs=2, batch_size=32, embed_dim=32, hidden_dim=64, threshold=2, val_sample=20, device="cpu",
        workers=0, decoder="pooled",
    )
    return train(cfg, show_progress=False)


@pytest.fixture(scope="session")
def tiny_attention_run(tmp_path_factory, small_synthetic) -> Path:
    """An attention decoder trained for 2 epochs on efficientnet_lite0 grids of the small synthetic set."""
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny-attention"
    cfg = TrainConfig(
        backbone="efficientnet_lite0", dataset=str(small_synthetic), weights="imagenet", out=str(out),
        epochs=2, batch_size=32, embed_dim=32, hidden_dim=64, context_dim=32, attention_dim=32, threshold=2,
        val_sample=20, device="cpu", workers=0, decoder="attention",
    )
    return train(cfg, show_progress=False)


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory, tiny_run) -> Path:
    """The tiny run exported to an ONNX bundle, shared by the serving and install tests."""
    from capcli.bundle.build import export

    return export(tiny_run, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported afresh for each test module that asks (a module may alter its copy)."""
    from capcli.bundle.build import export

    return export(tiny_run, tmp_path_factory.mktemp("exported") / "tiny")


@pytest.fixture(scope="module")
def test_images(small_synthetic) -> list[Path]:
    """Six images of the small synthetic set's test split."""
    from capcli.data.readers import load_dataset

    ds = load_dataset(str(small_synthetic))
    return [ds.image_path(n) for n in ds.splits["test"][:6]]
