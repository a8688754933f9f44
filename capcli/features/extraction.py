"""Feature extraction: images -> backbone -> float16 rows written into the cache (`capcli.features.cache`).

Only the rows the cache does not vouch for are computed (new, changed or previously failed images), a batch at
a time, each batch committed before the next, so an interrupted run resumes where it stopped. Images are read
by DataLoader workers that leave Ctrl-C to the main process; the backbone runs in PyTorch or, on CPU, in ONNX
Runtime on a graph exported once (`capcli.features.engines`).
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from pathlib import Path

import numpy as np

from capcli.backbone import Backbone
from capcli.devices import resolve_device
from capcli.errors import CapcliError
from capcli.features.cache import (
    FeatureCache,
    cache_dir,
    cache_writes,
    check_output,
    commit_rows,
    discard_cache,
    is_started,
    open_existing,
    output_grid,
    pending_rows,
    start_cache,
    stat_file,
)
from capcli.images import ImageError, load_pixels
from capcli.paths import atomic_write_json


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
    """Map-style dataset of (row, uint8 pixels or None, error, file stat) for the DataLoader workers; with `flip`
    the pixels are mirrored left to right."""

    def __init__(self, rows: list[int], paths: list[Path], prep, flip: bool = False):
        self.rows, self.paths, self.prep, self.flip = rows, paths, prep, flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        # Stat before reading: if the file changes in between, the next run sees a newer stat.
        stat = stat_file(self.paths[i])
        try:
            pixels = load_pixels(self.paths[i], self.prep)
            return self.rows[i], np.ascontiguousarray(pixels[:, ::-1]) if self.flip else pixels, None, stat
        except ImageError as exc:
            return self.rows[i], None, str(exc), stat


def _collate(items):
    import torch

    ok = [(r, x) for r, x, e, _ in items if e is None]
    failed = [(r, e) for r, x, e, _ in items if e is not None]
    # Stats in the order commit_rows writes rows: the good ones, then the failed ones.
    stats = [s for _, _, e, s in items if e is None] + [s for _, _, e, s in items if e is not None]
    batch = torch.from_numpy(np.stack([x for _, x in ok])) if ok else None
    return [r for r, _ in ok], batch, failed, np.asarray(stats, dtype=np.int64).reshape(-1, 2)


def _check_options(batch_size: int, workers: int | None) -> None:
    problems = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"--batch-size must be at least 1 (got {batch_size})")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        problems.append(f"--workers must be 0 or more (got {workers})")
    if problems:
        raise CapcliError("; ".join(problems))


def _default_workers(device: str, engine: str = "torch") -> int:
    from capcli.features.engines import cpu_runs

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
    flip: bool = False,
) -> FeatureCache:
    """Extract features for every image of `dataset` not validly cached yet; returns the cache.

    Resumes an interrupted run, re-extracts images whose file changed since their row was made,
    and retries images that failed before. output: "pooled" ([N, D] rows) or "grid" ([N, P, C]
    rows, for backbones that declare a grid) or "trunk:SPLIT" (a split point's trunk, the same layout); `flip`
    mirrors every image left to right (a cache of its own). engine: 'torch', 'onnx' (ONNX Runtime on a cached graph of
    the backbone, see capcli.features.engines) or 'auto' (ONNX Runtime on CPU, PyTorch on CUDA); both give the
    same rows up to float16 rounding, so the cache key leaves the engine out and the meta records it.
    """
    from capcli.features.engines import record_engine, resolve_engine

    _check_options(batch_size, workers)
    check_output(output)
    grid = None if output == "pooled" else output_grid(backbone, output)
    row = (grid.positions, grid.channels) if grid is not None else (backbone.feature_dim,)
    device = resolve_device(device)
    engine = resolve_engine(engine, device)
    path = cache_dir(backbone, weights, dataset, output, flip)
    paths = [dataset.image_path(name) for name in dataset.images]
    needed = len(paths) * int(np.prod(row)) * 2
    fresh = not is_started(path)
    # A new cache reserves its whole file on disk (GBs for a large set): a bad --weights is found first.
    model = _build(backbone, weights, device, engine, output) if fresh and paths else None
    with cache_writes(path, needed):
        state = start_cache(path, backbone, weights, dataset, output, flip)
        pending = pending_rows(path, state, paths)
        if pending and record_engine(state.meta, engine):
            atomic_write_json(path / "meta.json", state.meta)
    if pending:
        if workers is None:
            workers = _default_workers(device, engine)
        if len(pending) <= batch_size:
            workers = 0  # one batch: starting worker processes would cost more than it hides
        try:
            _extract_rows(backbone, weights, path, state, pending, paths, batch_size, workers, device,
                          show_progress, stop_after_batches, engine, output, model, flip)
        except BaseException:
            if fresh and not state.done.any():
                discard_cache(path, state)  # nothing in it yet: give the reserved space back
            raise
    meta = state.meta
    del state
    return open_existing(path, meta)


def _extract_rows(backbone, weights, path, state, pending, paths, batch_size, workers, device,
                  show_progress, stop_after_batches, engine, output="pooled", model=None, flip=False) -> None:
    from capcli.console import progress

    loader = image_loader(_ImageInputs(pending, [paths[i] for i in pending], backbone.preprocessing, flip),
                          batch_size, workers, device)
    # Built now, so a weights problem shows before any image is read; but when only failed images
    # are retried, only once one of them reads (usually none does, and no model is needed).
    retry_only = all(state.meta["images"][row] in state.meta["failed"] for row in pending)
    if model is None and not retry_only:
        model = _build(backbone, weights, device, engine, output)
    n_images, needed = len(state.done), state.features.size * 2
    with progress(transient=not show_progress) as bar:
        what = backbone.name if output == "pooled" else f"{backbone.name} {output}"
        what += " flipped" if flip else ""
        task = bar.add_task(f"features {what} ({engine})", total=n_images, info="")
        bar.update(task, completed=n_images - len(pending))
        start, seen, warned = time.perf_counter(), 0, []
        in_flight: deque = deque()  # (rows, features being computed or None, failed, stats), oldest first

        def finish(rows, computing, failed, stats) -> None:
            nonlocal seen
            out = None
            if computing is not None:
                out = computing.result()
                if output != "pooled":  # [B, C, H, W] -> [B, P, C], P = H*W row-major
                    out = out.reshape(out.shape[0], out.shape[1], -1).transpose(0, 2, 1)
                out = to_float16(out, what, weights, warned)
            with cache_writes(path, needed):
                commit_rows(path, state, rows, out, failed, stats)
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
    from capcli.features.engines import make_extractor

    return make_extractor(backbone, weights, engine, device, output)


def _build_or_clear(bar, backbone: Backbone, weights: str, device: str, engine: str, output: str = "pooled"):
    """The model, built under a progress bar: a build error (offline weights, bad file) clears the bar
    first, so the user sees one line."""
    try:
        return _build(backbone, weights, device, engine, output)
    except BaseException:
        bar.live.transient = True
        raise


