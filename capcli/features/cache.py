"""The feature cache: float16 rows in a memory-mapped array, keyed, validated and committed batch by batch.

A cache is keyed by backbone, weights, preprocessing, the dataset's image list and the resolved
image folder. It also records, per row, the size and mtime of the file the row was made from:
every run stats the files and re-extracts rows whose file changed, and retries images that
failed before (a missing file may have appeared), so a cache never vouches for pixels it did not
see. A second run over an unchanged dataset only stats the files.

Rows are flushed, then their file stats saved, before the 'done' mask that vouches for them is
(atomically) replaced, so a run killed at any point resumes without redoing finished batches and
never leaves a cache that loads but is wrong. The feature file is preallocated, so a full disk
is an error up front rather than a SIGBUS from the memory map.

With output="grid" the rows are the backbone's feature grid before pooling, [N, P, C] (P = H*W
positions, row-major), for the attention decoder; the key adds the grid. Such caches are ~50x
larger, so training reads them row by row (`capcli.train.feature_rows`) instead of loading the array.
With output="trunk:SPLIT" the rows are the output of a split point's frozen trunk (same [N, P, C] layout), which
`capcli train --finetune` feeds to the trainable tail; with flip=True every row is made from the image mirrored
left to right (training's flip augmentation). Both are part of the key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capcli.backbone import Backbone, weights_id
from capcli.errors import CapcliError
from capcli.paths import atomic_write_bytes, atomic_write_json, cache_root, describe_os_error

FORMAT = "capcli-features/2"
NO_FILE = -1  # size and mtime recorded for a file that could not be stat'ed
OUTPUTS = ("pooled", "grid", "trunk:SPLIT")
TRUNK = "trunk:"


@dataclass
class FeatureCache:
    """Extracted features: one float16 row per image; failed images listed with their reason."""

    path: Path
    meta: dict
    features: np.ndarray  # [N, D] float16 (grid: [N, P, C]), memory-mapped read-only
    done: np.ndarray  # [N] bool

    @property
    def images(self) -> list[str]:
        return self.meta["images"]

    @property
    def failed(self) -> dict[str, str]:
        return self.meta.get("failed", {})

    @property
    def images_dir(self) -> str:
        return self.meta["images_dir"]

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def row_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.images)}


@dataclass
class CacheProgress:
    """The writable state of a cache being filled: rows, their file stats, what is done."""

    meta: dict
    features: np.ndarray  # [N, D] float16 (grid: [N, P, C]), memory-mapped read-write
    stats: np.ndarray  # [N, 2] int64: size and mtime_ns of the file each row was read from
    done: np.ndarray  # [N] bool


def cache_key(
    backbone: Backbone,
    weights: str,
    images: list[str],
    dataset_fingerprint: str,
    images_dir: str | Path,
    output: str = "pooled",
    flip: bool = False,
) -> str:
    ident = {
        "format": FORMAT,
        "backbone": backbone.name,
        "feature_dim": backbone.feature_dim,
        "weights": weights_id(weights),
        "preprocessing": backbone.preprocessing.to_dict(),
        "dataset": dataset_fingerprint,
        "images": hashlib.sha256("\n".join(images).encode()).hexdigest(),
        "images_dir": str(Path(images_dir).resolve()),
    }
    if output != "pooled":  # pooled keys stay as they are
        ident |= {"output": output, "grid": output_grid(backbone, output).to_dict()}
    if flip:
        ident["flip"] = True
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(backbone: Backbone, weights: str, dataset, output: str = "pooled", flip: bool = False) -> Path:
    check_output(output)
    key = cache_key(backbone, weights, dataset.images, dataset.fingerprint(), dataset.images_dir, output, flip)
    kind = "" if output == "pooled" else "-" + output.replace(":", "-")
    return cache_root() / "features" / f"{dataset.name}-{backbone.name}{kind}{'-flip' if flip else ''}-{key}"


def check_output(output: str) -> None:
    if output not in ("pooled", "grid") and not (output.startswith(TRUNK) and len(output) > len(TRUNK)):
        raise CapcliError(f"unknown feature output '{output}'; one of {', '.join(OUTPUTS)}")


def trunk_output(split: str) -> str:
    """The output name of a split point's trunk."""
    return TRUNK + split


def output_grid(backbone: Backbone, output: str):
    """The rows' grid for a grid or trunk output (a `capcli.backbone.Grid`); a clear error when undeclared."""
    check_output(output)
    if output.startswith(TRUNK):
        return backbone.split(output[len(TRUNK):]).trunk
    return backbone.require_grid()


def row_shape(meta: dict) -> tuple[int, ...]:
    """One image's features: (D,) pooled, (P, C) for a grid."""
    grid = meta.get("grid")
    return (grid["height"] * grid["width"], grid["channels"]) if grid else (meta["feature_dim"],)


def file_stats(paths: list[Path]) -> np.ndarray:
    """[N, 2] int64: each file's size and mtime in ns; NO_FILE for a file that cannot be stat'ed."""
    stats = np.full((len(paths), 2), NO_FILE, dtype=np.int64)
    for i, path in enumerate(paths):
        stats[i] = stat_file(path)
    return stats


def stat_file(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return NO_FILE, NO_FILE
    return st.st_size, st.st_mtime_ns


def _save_array(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def open_existing(path: Path, meta: dict) -> FeatureCache:
    features = np.load(path / "features.npy", mmap_mode="r")
    done = np.load(path / "done.npy")
    if features.shape != (len(meta["images"]), *row_shape(meta)) or done.shape != (len(meta["images"]),):
        raise CapcliError(f"feature cache {path} is damaged (shapes disagree); delete the folder and rerun")
    return FeatureCache(path, meta, features, done)


def is_started(path: Path) -> bool:
    return all((path / name).is_file() for name in ("meta.json", "done.npy", "stats.npy", "features.npy"))


def open_cache(backbone: Backbone, weights: str, dataset, output: str = "pooled",
               flip: bool = False) -> FeatureCache | None:
    """The complete cache for this backbone/weights/dataset (and output), or None (files are not re-checked here)."""
    path = cache_dir(backbone, weights, dataset, output, flip)
    if not is_started(path):
        return None
    cache = open_existing(path, json.loads((path / "meta.json").read_text()))
    return cache if cache.complete else None


@contextmanager
def cache_writes(path: Path, needed_bytes: int):
    """Errors writing the cache (a full disk, a read-only folder) become one line saying what to do."""
    hint = (f"the cache stays consistent: free some space (its features take {needed_bytes / 2**20:.1f} MiB) "
            "or set CAPCLI_CACHE to another disk, then rerun to resume")
    try:
        yield
    except OSError as exc:
        raise CapcliError(f"cannot write the feature cache in {path}: {describe_os_error(exc)}; {hint}") from None
    except CapcliError as exc:  # the atomic writer's own line, which names the file
        raise CapcliError(f"{exc}; {hint}") from None


def start_cache(path: Path, backbone: Backbone, weights: str, dataset, output: str = "pooled",
                flip: bool = False) -> CacheProgress:
    """Reopen the cache files an earlier run left, or create them."""
    if is_started(path):
        meta = json.loads((path / "meta.json").read_text())
        features = np.load(path / "features.npy", mmap_mode="r+")
        return CacheProgress(meta, features, np.load(path / "stats.npy"), np.load(path / "done.npy"))
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "backbone": backbone.name,
        "weights": weights,
        "weights_id": weights_id(weights),
        "feature_dim": backbone.feature_dim,
        "preprocessing": backbone.preprocessing.to_dict(),
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "images_dir": str(Path(dataset.images_dir).resolve()),
        "images": list(dataset.images),
        "failed": {},
    }
    if output != "pooled":
        meta |= {"output": output, "grid": output_grid(backbone, output).to_dict()}
    if flip:
        meta["flip"] = True
    n = len(meta["images"])
    features = _create_feature_file(path / "features.npy", (n, *row_shape(meta)))
    state = CacheProgress(meta, features, np.full((n, 2), NO_FILE, dtype=np.int64), np.zeros(n, dtype=bool))
    # Order matters: data file, stats and mask, then meta; a run only trusts a folder with all of them.
    _save_array(path / "stats.npy", state.stats)
    _save_array(path / "done.npy", state.done)
    atomic_write_json(path / "meta.json", meta)
    return state


def _create_feature_file(file: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed float16 memmap whose blocks are all reserved on disk now."""
    try:
        features = np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=shape)
        if hasattr(os, "posix_fallocate"):
            # A sparse file would make a full disk a SIGBUS on the first row written through the map.
            fd = os.open(file, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        return features
    except OSError:
        file.unlink(missing_ok=True)  # give the space back; without meta.json the folder is not a cache
        raise


def pending_rows(path: Path, state: CacheProgress, paths: list[Path]) -> list[int]:
    """Rows to (re)extract: never done, made from a file that changed since, or failed before."""
    failed = np.zeros(len(state.done), dtype=bool)
    row_of = {name: i for i, name in enumerate(state.meta["images"])}
    failed[[row_of[name] for name in state.meta["failed"] if name in row_of]] = True
    changed = state.done & ~failed & (file_stats(paths) != state.stats).any(axis=1)
    if changed.any():
        state.done[changed] = False  # un-vouch for them before any of their rows is rewritten
        _save_array(path / "done.npy", state.done)
    return np.flatnonzero(~state.done | failed).tolist()


def commit_rows(path: Path, state: CacheProgress, rows: list[int], out: np.ndarray | None, failed, stats) -> None:
    """Write one batch: rows (flushed), their file stats, failures, then the mask that vouches for them."""
    if rows:
        state.features[rows] = out
        state.features.flush()
    read = rows + [r for r, _ in failed]
    if not np.array_equal(state.stats[read], stats):
        state.stats[read] = stats
        _save_array(path / "stats.npy", state.stats)
    names, recorded = state.meta["images"], state.meta["failed"]
    before = dict(recorded)
    for row in rows:  # a retried image that now reads is no longer failed
        recorded.pop(names[row], None)
    recorded.update((names[row], reason) for row, reason in failed)
    if recorded != before:
        atomic_write_json(path / "meta.json", state.meta)
    if not state.done[read].all():  # retrying a failure that fails again changes nothing
        state.done[read] = True
        _save_array(path / "done.npy", state.done)


def discard_cache(path: Path, state: CacheProgress) -> None:
    state.features = None  # the memmap must be closed before its file goes
    (path / "meta.json").unlink(missing_ok=True)  # first: without it the folder is not a cache
    shutil.rmtree(path, ignore_errors=True)


def load_features(backbone: Backbone, weights: str, dataset, output: str = "pooled",
                  flip: bool = False) -> FeatureCache:
    """The complete cache, or a clear error saying how to make it."""
    cache = open_cache(backbone, weights, dataset, output, flip)
    if cache is None:
        grid = {"pooled": "", "grid": " --grid"}.get(output, f" --split {output[len(TRUNK):]}")
        grid += " --flip" if flip else ""
        grid += f" --resize-mode {backbone.preprocessing.resize_mode}"
        raise CapcliError(
            f"no complete {output} feature cache for {backbone.name} ({weights}) on {dataset.name}; "
            f"run: capcli features --backbone {backbone.name} --dataset {dataset.name}{grid}"
        )
    return cache
