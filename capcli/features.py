"""Cached feature extraction: images -> backbone -> float16 rows in a memory-mapped array.

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
larger, so training reads them row by row (`capcli.feature_rows`) instead of loading the array.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capcli.backbone import Backbone, weights_id
from capcli.errors import CapcliError
from capcli.images import ImageError, load_pixels
from capcli.paths import atomic_write_bytes, atomic_write_json, cache_root, describe_os_error

FORMAT = "capcli-features/2"
NO_FILE = -1  # size and mtime recorded for a file that could not be stat'ed
OUTPUTS = ("pooled", "grid")


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
class _Progress:
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
    if output == "grid":  # pooled keys stay as they are
        ident |= {"output": "grid", "grid": backbone.require_grid().to_dict()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(backbone: Backbone, weights: str, dataset, output: str = "pooled") -> Path:
    _check_output(output)
    key = cache_key(backbone, weights, dataset.images, dataset.fingerprint(), dataset.images_dir, output)
    kind = "-grid" if output == "grid" else ""
    return cache_root() / "features" / f"{dataset.name}-{backbone.name}{kind}-{key}"


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise CapcliError(f"unknown feature output '{output}'; one of {', '.join(OUTPUTS)}")


def row_shape(meta: dict) -> tuple[int, ...]:
    """One image's features: (D,) pooled, (P, C) for a grid."""
    grid = meta.get("grid")
    return (grid["height"] * grid["width"], grid["channels"]) if grid else (meta["feature_dim"],)


def file_stats(paths: list[Path]) -> np.ndarray:
    """[N, 2] int64: each file's size and mtime in ns; NO_FILE for a file that cannot be stat'ed."""
    stats = np.full((len(paths), 2), NO_FILE, dtype=np.int64)
    for i, path in enumerate(paths):
        stats[i] = _stat(path)
    return stats


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return NO_FILE, NO_FILE
    return st.st_size, st.st_mtime_ns


def _save_array(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _open(path: Path, meta: dict) -> FeatureCache:
    features = np.load(path / "features.npy", mmap_mode="r")
    done = np.load(path / "done.npy")
    if features.shape != (len(meta["images"]), *row_shape(meta)) or done.shape != (len(meta["images"]),):
        raise CapcliError(f"feature cache {path} is damaged (shapes disagree); delete the folder and rerun")
    return FeatureCache(path, meta, features, done)


def _is_started(path: Path) -> bool:
    return all((path / name).is_file() for name in ("meta.json", "done.npy", "stats.npy", "features.npy"))


def open_cache(backbone: Backbone, weights: str, dataset, output: str = "pooled") -> FeatureCache | None:
    """The complete cache for this backbone/weights/dataset (and output), or None (files are not re-checked here)."""
    path = cache_dir(backbone, weights, dataset, output)
    if not _is_started(path):
        return None
    cache = _open(path, json.loads((path / "meta.json").read_text()))
    return cache if cache.complete else None


@contextmanager
def _cache_writes(path: Path, needed_bytes: int):
    """Errors writing the cache (a full disk, a read-only folder) become one line saying what to do."""
    hint = (f"the cache stays consistent: free some space (its features take {needed_bytes / 2**20:.1f} MiB) "
            "or set CAPCLI_CACHE to another disk, then rerun to resume")
    try:
        yield
    except OSError as exc:
        raise CapcliError(f"cannot write the feature cache in {path}: {describe_os_error(exc)}; {hint}") from None
    except CapcliError as exc:  # the atomic writer's own line, which names the file
        raise CapcliError(f"{exc}; {hint}") from None


def _start(path: Path, backbone: Backbone, weights: str, dataset, output: str = "pooled") -> _Progress:
    """Reopen the cache files an earlier run left, or create them."""
    if _is_started(path):
        meta = json.loads((path / "meta.json").read_text())
        features = np.load(path / "features.npy", mmap_mode="r+")
        return _Progress(meta, features, np.load(path / "stats.npy"), np.load(path / "done.npy"))
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
    if output == "grid":
        meta |= {"output": "grid", "grid": backbone.require_grid().to_dict()}
    n = len(meta["images"])
    features = _create_feature_file(path / "features.npy", (n, *row_shape(meta)))
    state = _Progress(meta, features, np.full((n, 2), NO_FILE, dtype=np.int64), np.zeros(n, dtype=bool))
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


def _pending_rows(path: Path, state: _Progress, paths: list[Path]) -> list[int]:
    """Rows to (re)extract: never done, made from a file that changed since, or failed before."""
    failed = np.zeros(len(state.done), dtype=bool)
    row_of = {name: i for i, name in enumerate(state.meta["images"])}
    failed[[row_of[name] for name in state.meta["failed"] if name in row_of]] = True
    changed = state.done & ~failed & (file_stats(paths) != state.stats).any(axis=1)
    if changed.any():
        state.done[changed] = False  # un-vouch for them before any of their rows is rewritten
        _save_array(path / "done.npy", state.done)
    return np.flatnonzero(~state.done | failed).tolist()


def _commit(path: Path, state: _Progress, rows: list[int], out: np.ndarray | None, failed, stats) -> None:
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


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process reports it once and shuts the
    # workers down; a worker must not print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def image_loader(inputs, batch_size: int, workers: int, device: str, collate_fn=None):
    """A DataLoader over `inputs` whose worker processes leave Ctrl-C to the main process."""
    import torch

    return torch.utils.data.DataLoader(
        inputs,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_fn or _collate,
        pin_memory=device.startswith("cuda"),
        worker_init_fn=_ignore_sigint if workers else None,
        persistent_workers=False,
    )


class _ImageInputs:
    """Map-style dataset of (row, uint8 pixels or None, error, file stat) for the DataLoader workers."""

    def __init__(self, rows: list[int], paths: list[Path], prep):
        self.rows, self.paths, self.prep = rows, paths, prep

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        # Stat before reading: if the file changes in between, the next run sees a newer stat.
        stat = _stat(self.paths[i])
        try:
            return self.rows[i], load_pixels(self.paths[i], self.prep), None, stat
        except ImageError as exc:
            return self.rows[i], None, str(exc), stat


def _collate(items):
    import torch

    ok = [(r, x) for r, x, e, _ in items if e is None]
    failed = [(r, e) for r, x, e, _ in items if e is not None]
    # Stats in the order _commit writes rows: the good ones, then the failed ones.
    stats = [s for _, _, e, s in items if e is None] + [s for _, _, e, s in items if e is not None]
    batch = torch.from_numpy(np.stack([x for _, x in ok])) if ok else None
    return [r for r, _ in ok], batch, failed, np.asarray(stats, dtype=np.int64).reshape(-1, 2)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CapcliError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise CapcliError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


def _check_options(batch_size: int, workers: int | None) -> None:
    problems = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"--batch-size must be at least 1 (got {batch_size})")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        problems.append(f"--workers must be 0 or more (got {workers})")
    if problems:
        raise CapcliError("; ".join(problems))


def _default_workers(device: str, engine: str = "torch") -> int:
    from capcli.engines import cpu_runs

    if engine == "onnx" and device == "cpu" and cpu_runs() > 1:
        return 0  # the main thread loads while ONNX Runtime's runs compute (engines.cpu_runs)
    # On CPU the forward needs the cores too: leave it half of them.
    cpus = os.cpu_count() or 1
    return min(8, cpus) if device.startswith("cuda") else max(1, cpus // 2)


F16_MAX = float(np.finfo(np.float16).max)


def to_float16(out: np.ndarray, what: str, weights: str, warned: list) -> np.ndarray:
    """Features as cached: float16, saturated rather than inf where a backbone exceeds its range (random
    weights can: a resnet152 with --weights none does), which is said once per extraction."""
    if not np.isfinite(out).all():
        raise CapcliError(f"{what} (weights {weights}) gave non-finite features: the backbone's weights are broken")
    if not warned and np.abs(out).max() > F16_MAX:
        from capcli.console import err

        err.print(f"note: {what} features (weights {weights}) exceed float16's range and are saturated in the "
                  f"cache; trained weights stay far below it", markup=False)
        warned.append(True)
    return np.clip(out, -F16_MAX, F16_MAX).astype(np.float16)


def extract(
    backbone: Backbone,
    dataset,
    weights: str = "imagenet",
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    show_progress: bool = True,
    stop_after_batches: int | None = None,
    output: str = "pooled",
    engine: str = "torch",
) -> FeatureCache:
    """Extract features for every image of `dataset` not validly cached yet; returns the cache.

    Resumes an interrupted run, re-extracts images whose file changed since their row was made,
    and retries images that failed before. output: "pooled" ([N, D] rows) or "grid" ([N, P, C]
    rows, for backbones that declare a grid). engine: 'torch', 'onnx' (ONNX Runtime on a cached graph of
    the backbone, see capcli.engines) or 'auto' (ONNX Runtime on CPU, PyTorch on CUDA); both give the
    same rows up to float16 rounding, so the cache key leaves the engine out and the meta records it.
    """
    from capcli.engines import record_engine, resolve_engine

    _check_options(batch_size, workers)
    _check_output(output)
    row = (backbone.require_grid().positions, backbone.require_grid().channels) if output == "grid" else (
        backbone.feature_dim,
    )
    device = resolve_device(device)
    engine = resolve_engine(engine, device)
    path = cache_dir(backbone, weights, dataset, output)
    paths = [dataset.image_path(name) for name in dataset.images]
    needed = len(paths) * int(np.prod(row)) * 2
    fresh = not _is_started(path)
    # A new cache reserves its whole file on disk (GBs for a large set): a bad --weights is found first.
    model = _build(backbone, weights, device, engine, output) if fresh and paths else None
    with _cache_writes(path, needed):
        state = _start(path, backbone, weights, dataset, output)
        pending = _pending_rows(path, state, paths)
        if pending and record_engine(state.meta, engine):
            atomic_write_json(path / "meta.json", state.meta)
    if pending:
        if workers is None:
            workers = _default_workers(device, engine)
        if len(pending) <= batch_size:
            workers = 0  # one batch: starting worker processes would cost more than it hides
        try:
            _extract_rows(backbone, weights, path, state, pending, paths, batch_size, workers, device,
                          show_progress, stop_after_batches, engine, output, model)
        except BaseException:
            if fresh and not state.done.any():
                _discard(path, state)  # nothing in it yet: give the reserved space back
            raise
    meta = state.meta
    del state
    return _open(path, meta)


def _discard(path: Path, state: _Progress) -> None:
    state.features = None  # the memmap must be closed before its file goes
    (path / "meta.json").unlink(missing_ok=True)  # first: without it the folder is not a cache
    shutil.rmtree(path, ignore_errors=True)


def _extract_rows(backbone, weights, path, state, pending, paths, batch_size, workers, device,
                  show_progress, stop_after_batches, engine, output="pooled", model=None) -> None:
    from capcli.console import progress

    loader = image_loader(_ImageInputs(pending, [paths[i] for i in pending], backbone.preprocessing),
                          batch_size, workers, device)
    # Built now, so a weights problem shows before any image is read; but when only failed images
    # are retried, only once one of them reads (usually none does, and no model is needed).
    retry_only = all(state.meta["images"][row] in state.meta["failed"] for row in pending)
    if model is None and not retry_only:
        model = _build(backbone, weights, device, engine, output)
    n_images, needed = len(state.done), state.features.size * 2
    with progress(transient=not show_progress) as bar:
        what = f"{backbone.name} grid" if output == "grid" else backbone.name
        task = bar.add_task(f"features {what} ({engine})", total=n_images, info="")
        bar.update(task, completed=n_images - len(pending))
        start, seen, warned = time.perf_counter(), 0, []
        in_flight: deque = deque()  # (rows, features being computed or None, failed, stats), oldest first

        def finish(rows, computing, failed, stats) -> None:
            nonlocal seen
            out = None
            if computing is not None:
                out = computing.result()
                if output == "grid":  # [B, C, H, W] -> [B, P, C], P = H*W row-major
                    out = out.reshape(out.shape[0], out.shape[1], -1).transpose(0, 2, 1)
                out = to_float16(out, what, weights, warned)
            with _cache_writes(path, needed):
                _commit(path, state, rows, out, failed, stats)
            seen += len(rows) + len(failed)
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=len(rows) + len(failed), info=f"{rate:.1f} img/s")

        for n_batch, (rows, batch, failed, stats) in enumerate(loader):
            computing = None
            if batch is not None:
                if model is None:
                    model = _build_or_clear(bar, backbone, weights, device, engine, output)
                computing = model.submit(batch)
            in_flight.append((rows, computing, failed, stats))
            while len(in_flight) > _batches_ahead(model):
                finish(*in_flight.popleft())
            if stop_after_batches is not None and n_batch + 1 >= stop_after_batches:
                break
        while in_flight:
            finish(*in_flight.popleft())


def _batches_ahead(model) -> int:
    """Batches left computing while the next one is loaded: none for an extractor that computes in place; with
    several runs at once (small CPUs, engines.cpu_runs) as many as the runs, so every core computes meanwhile.
    Rows are committed oldest first, as their batches finish."""
    runs = model.runs if model is not None else 1
    return runs if runs > 1 else 0


def _build(backbone: Backbone, weights: str, device: str, engine: str, output: str = "pooled"):
    """The extractor: uint8 pixel batch -> float32 features (or grids), in PyTorch or ONNX Runtime."""
    from capcli.engines import make_extractor

    return make_extractor(backbone, weights, engine, device, output)


def _build_or_clear(bar, backbone: Backbone, weights: str, device: str, engine: str, output: str = "pooled"):
    """The model, built under a progress bar: a build error (offline weights, bad file) clears the bar
    first, so the user sees one line."""
    try:
        return _build(backbone, weights, device, engine, output)
    except BaseException:
        bar.live.transient = True
        raise


def load_features(backbone: Backbone, weights: str, dataset, output: str = "pooled") -> FeatureCache:
    """The complete cache, or a clear error saying how to make it."""
    cache = open_cache(backbone, weights, dataset, output)
    if cache is None:
        grid = " --grid" if output == "grid" else ""
        raise CapcliError(
            f"no complete {output} feature cache for {backbone.name} ({weights}) on {dataset.name}; "
            f"run: capcli features --backbone {backbone.name} --dataset {dataset.name}{grid}"
        )
    return cache
