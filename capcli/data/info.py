"""Summary statistics of a dataset, and checks that its images are there and readable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from capcli.data.records import CaptionDataset
from capcli.data.text import build_vocabulary, tokenize
from capcli.images import ImageError, load_rgb


def dataset_info(
    ds: CaptionDataset,
    threshold: int = 5,
    check_images: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Counts per split, vocabulary size, caption lengths, and missing / unreadable images.

    With check_images, every image is decoded (slow for large sets; `progress` is called with the
    number checked so far); without, only their existence is checked.
    """
    missing, unreadable = _check_images(ds, decode=check_images, progress=progress)
    return {
        "name": ds.name,
        "format": ds.format,
        "annotation": str(ds.annotation),
        "images_dir": str(ds.images_dir),
        "fingerprint": ds.fingerprint(),
        "splits": {
            split: {"images": len(names), "captions": sum(len(ds.captions[n]) for n in names)}
            for split, names in ds.splits.items()
        },
        "images": len(ds.captions),
        "captions": sum(len(c) for c in ds.captions.values()),
        "vocab_threshold": threshold,
        "vocab_size": len(build_vocabulary(ds, threshold)),
        "caption_words": _length_stats(ds),
        "missing_images": missing,
        "unreadable_images": unreadable,
        "images_checked": "decoded" if check_images else "existence only",
        "notes": list(ds.notes),
    }


def _length_stats(ds: CaptionDataset) -> dict[str, float]:
    lengths = np.array([len(tokenize(c)) for caps in ds.captions.values() for c in caps], dtype=np.int64)
    if lengths.size == 0:
        return {"min": 0, "mean": 0.0, "max": 0, "p95": 0.0}
    return {
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 2),
        "max": int(lengths.max()),
        "p95": float(np.percentile(lengths, 95)),
    }


def _check_images(
    ds: CaptionDataset, decode: bool, progress: Callable[[int], None] | None
) -> tuple[list[str], list[str]]:
    """(missing image names, unreadable image names), both sorted."""
    missing, unreadable = [], []
    for done, image in enumerate(ds.images, 1):
        path = ds.image_path(image)
        if not path.is_file():
            missing.append(image)
        elif decode:
            try:
                load_rgb(path)
            except ImageError:
                unreadable.append(image)
        if progress is not None:
            progress(done)
    return missing, unreadable
