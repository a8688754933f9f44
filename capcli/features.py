"""Cached feature extraction: images -> backbone -> float16 rows in a memory-mapped array.

A cache is keyed by backbone, weights, preprocessing and the dataset's image list, so a second
run is a no-op. Rows are flushed before the 'done' mask that vouches for them is (atomically)
replaced, so a run killed at any point resumes without redoing finished batches and never
leaves a cache that loads but is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capcli.backbone import Backbone, weights_id
from capcli.errors import CapcliError
from capcli.images import ImageError, load_pixels
from capcli.paths import atomic_write_bytes, atomic_write_json, cache_root

FORMAT = "capcli-features/1"


@dataclass
class FeatureCache:
    """Extracted features: one float16 row per image; failed images listed with their reason."""

    path: Path
    meta: dict
    features: np.ndarray  # [N, D] float16, memory-mapped read-only
    done: np.ndarray  # [N] bool

    @property
    def images(self) -> list[str]:
        return self.meta["images"]

    @property
    def failed(self) -> dict[str, str]:
        return self.meta.get("failed", {})

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def row_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.images)}


def cache_key(backbone: Backbone, weights: str, images: list[str], dataset_fingerprint: str) -> str:
    ident = {
        "format": FORMAT,
        "backbone": backbone.name,
        "feature_dim": backbone.feature_dim,
        "weights": weights_id(weights),
        "preprocessing": backbone.preprocessing.to_dict(),
        "dataset": dataset_fingerprint,
        "images": hashlib.sha256("\n".join(images).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(backbone: Backbone, weights: str, dataset) -> Path:
    key = cache_key(backbone, weights, dataset.images, dataset.fingerprint())
    return cache_root() / "features" / f"{dataset.name}-{backbone.name}-{key}"


def _save_mask(path: Path, mask: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, mask)
    atomic_write_bytes(path, buf.getvalue())


def _open(path: Path, meta: dict) -> FeatureCache:
    features = np.load(path / "features.npy", mmap_mode="r")
    done = np.load(path / "done.npy")
    if features.shape != (len(meta["images"]), meta["feature_dim"]) or done.shape != (len(meta["images"]),):
        raise CapcliError(f"feature cache {path} is damaged (shapes disagree); delete the folder and rerun")
    return FeatureCache(path, meta, features, done)


def open_cache(backbone: Backbone, weights: str, dataset) -> FeatureCache | None:
    """The complete cache for this backbone/weights/dataset, or None."""
    path = cache_dir(backbone, weights, dataset)
    if not (path / "meta.json").is_file() or not (path / "done.npy").is_file():
        return None
    cache = _open(path, json.loads((path / "meta.json").read_text()))
    return cache if cache.complete else None


def _start(path: Path, backbone: Backbone, weights: str, dataset) -> tuple[dict, np.ndarray, np.ndarray]:
    """Create the cache files, or reopen the ones an interrupted run left."""
    path.mkdir(parents=True, exist_ok=True)
    meta_path = path / "meta.json"
    if meta_path.is_file() and (path / "done.npy").is_file() and (path / "features.npy").is_file():
        meta = json.loads(meta_path.read_text())
        return meta, np.load(path / "features.npy", mmap_mode="r+"), np.load(path / "done.npy")
    meta = {
        "format": FORMAT,
        "backbone": backbone.name,
        "weights": weights,
        "weights_id": weights_id(weights),
        "feature_dim": backbone.feature_dim,
        "preprocessing": backbone.preprocessing.to_dict(),
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "images": list(dataset.images),
        "failed": {},
    }
    features = np.lib.format.open_memmap(
        path / "features.npy", mode="w+", dtype=np.float16, shape=(len(meta["images"]), backbone.feature_dim)
    )
    done = np.zeros(len(meta["images"]), dtype=bool)
    # Order matters: data file, then mask, then meta; a run only trusts a folder with all three.
    features.flush()
    _save_mask(path / "done.npy", done)
    atomic_write_json(meta_path, meta)
    return meta, features, done


class _ImageInputs:
    """Map-style dataset of (row, uint8 pixels or None, error) for the DataLoader workers."""

    def __init__(self, rows: list[int], paths: list[Path], prep):
        self.rows, self.paths, self.prep = rows, paths, prep

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        try:
            return self.rows[i], load_pixels(self.paths[i], self.prep), None
        except ImageError as exc:
            return self.rows[i], None, str(exc)


def _collate(items):
    import torch

    ok = [(r, x) for r, x, e in items if e is None]
    failed = [(r, e) for r, x, e in items if e is not None]
    rows = [r for r, _ in ok]
    batch = torch.from_numpy(np.stack([x for _, x in ok])) if ok else None
    return rows, batch, failed


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CapcliError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise CapcliError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


def extract(
    backbone: Backbone,
    dataset,
    weights: str = "imagenet",
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    show_progress: bool = True,
    stop_after_batches: int | None = None,
    engine: str = "torch",
) -> FeatureCache:
    """Extract features for every image of `dataset`, resuming an interrupted run; returns the cache.

    engine: 'torch', 'onnx' (ONNX Runtime on a cached graph of the backbone) or 'auto' (ONNX Runtime on
    CPU, PyTorch on CUDA). Both give the same features up to float16 rounding, so the cache key leaves the
    engine out; the cache's meta records it.
    """
    import torch

    from capcli.engines import default_workers, make_extractor, record_engine, resolve_engine

    cached = open_cache(backbone, weights, dataset)
    if cached is not None:
        return cached
    device = resolve_device(device)
    engine = resolve_engine(engine, device)
    path = cache_dir(backbone, weights, dataset)
    meta, features, done = _start(path, backbone, weights, dataset)
    if record_engine(meta, engine):
        atomic_write_json(path / "meta.json", meta)
    pending = [i for i in range(len(meta["images"])) if not done[i]]
    extractor = make_extractor(backbone, weights, engine, device)
    paths = [dataset.image_path(meta["images"][i]) for i in pending]
    if workers is None:
        workers = default_workers(engine, device)
    loader = torch.utils.data.DataLoader(
        _ImageInputs(pending, paths, backbone.preprocessing),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.startswith("cuda"),
        persistent_workers=False,
    )
    from capcli.console import progress

    with progress(transient=not show_progress) as bar:
        task = bar.add_task(f"features {backbone.name} ({engine})", total=len(meta["images"]), info="")
        bar.update(task, completed=len(meta["images"]) - len(pending))
        start, seen = time.perf_counter(), 0
        for n_batch, (rows, batch, failed) in enumerate(loader):
            if batch is not None:
                features[rows] = extractor(batch).astype(np.float16)
                features.flush()
            for row, reason in failed:
                meta["failed"][meta["images"][row]] = reason
            if failed:
                atomic_write_json(path / "meta.json", meta)
            done[rows + [r for r, _ in failed]] = True
            _save_mask(path / "done.npy", done)
            seen += len(rows) + len(failed)
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=len(rows) + len(failed), info=f"{rate:.1f} img/s")
            if stop_after_batches is not None and n_batch + 1 >= stop_after_batches:
                break
    del features
    return _open(path, meta)


def load_features(backbone: Backbone, weights: str, dataset) -> FeatureCache:
    """The complete cache, or a clear error saying how to make it."""
    cache = open_cache(backbone, weights, dataset)
    if cache is None:
        raise CapcliError(
            f"no complete feature cache for {backbone.name} ({weights}) on {dataset.name}; "
            f"run: capcli features --backbone {backbone.name} --dataset {dataset.name}"
        )
    return cache
