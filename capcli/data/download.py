"""Fetching the public Flickr datasets from Kaggle with kagglehub, and finding them in its cache."""

from __future__ import annotations

import os
from pathlib import Path

from capcli.errors import CapcliError

KAGGLE_DATASETS = {
    "flickr8k": "adityajn105/flickr8k",
    "flickr30k": "hsankesara/flickr-image-dataset",
}


def _handle(name: str) -> str:
    try:
        return KAGGLE_DATASETS[name]
    except KeyError:
        choices = ", ".join(KAGGLE_DATASETS)
        raise CapcliError(f"unknown dataset {name!r} to download; choose one of: {choices}") from None


def download(name: str) -> Path:
    """Download (or reuse kagglehub's cached copy of) a named dataset; returns its folder."""
    handle = _handle(name)
    import kagglehub  # outside the try: a missing kagglehub is the CLI's capcli[train] hint, not a network error

    try:
        path = kagglehub.dataset_download(handle)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # kagglehub raises many kinds (HTTP, auth, OS); all mean "could not download"
        reason = (str(exc).splitlines() or [""])[0].strip() or type(exc).__name__
        raise CapcliError(
            f"could not download {name} from Kaggle ({reason[:200]}): check the network / Kaggle credentials"
        ) from None
    return Path(path)


def _kagglehub_cache() -> Path:
    # kagglehub's own convention: $KAGGLEHUB_CACHE, else ~/.cache/kagglehub.
    root = os.environ.get("KAGGLEHUB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "kagglehub"


def downloaded_path(name: str) -> Path | None:
    """The newest completely downloaded version in kagglehub's cache, without touching the network."""
    owner, dataset = _handle(name).split("/")
    base = _kagglehub_cache() / "datasets" / owner / dataset
    versions_dir = base / "versions"
    if not versions_dir.is_dir():
        return None
    versions = sorted((int(p.name) for p in versions_dir.iterdir() if p.name.isdigit()), reverse=True)
    for version in versions:
        # kagglehub writes `<version>.complete` beside `versions/` once a download finished.
        if (base / f"{version}.complete").exists() and (versions_dir / str(version)).is_dir():
            return versions_dir / str(version)
    return None
