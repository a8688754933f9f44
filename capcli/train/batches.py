"""What the training loop feeds the decoder, batch by batch: pooled vectors from RAM, or grids from the cache file.

Both sources yield `(caption indices, decoder inputs)` where the inputs are the keyword arguments of
the decoder's forward besides the tokens: `{"features": [N, D]}` for the pooled decoder, and
`{"grid": [U, P, C], "rows": [N]}` for the attention decoder, with each image of the batch read and
encoded once however many of its captions the batch holds. (With --finetune the "grid" rows are the trunk's
output, which the tuned tail turns into the grid.)

Flip augmentation: given a second cache of the same rows made from mirrored images and, per epoch, which images
to show mirrored (`flips`, [images] bool), each image's row comes from one cache or the other, and the inputs
carry `"flipped"` [N]: the captions whose image is mirrored (the loop swaps their left and right).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from capcli.train.feature_rows import RowReader


class PooledFeatures:
    """Pooled features held in memory: small (COCO at 2048-d is ~0.5 GB in float16).

    With CUDA they live on the GPU and batches are indexed there, so no host-to-device copy sits in
    the training loop.
    """

    def __init__(self, cache, device: str, flipped=None):
        self.device = device
        self.feats = self._held(cache)
        self.mirrored = self._held(flipped) if flipped is not None else None

    def _held(self, cache) -> torch.Tensor:
        feats = torch.from_numpy(np.array(cache.features))  # float16 copy in RAM; float32 per batch
        return feats.to(self.device) if self.device.startswith("cuda") else feats

    def batches(self, rows: torch.Tensor, batches: list[torch.Tensor],
                flips: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, dict]]:
        for idx in batches:
            picked = rows[idx]
            if flips is None or self.mirrored is None:
                yield idx, {"features": self.feats[picked].to(self.device, non_blocking=True)}
                continue
            flipped = flips[picked]
            feats = torch.where(flipped.to(self.feats.device)[:, None], self.mirrored[picked], self.feats[picked])
            yield idx, {"features": feats.to(self.device, non_blocking=True), "flipped": flipped}

    def images(self, rows: list[int]) -> torch.Tensor:
        return self.feats[rows].to(self.device)


class _GridBatches(torch.utils.data.Dataset):
    """Item i is batch i: (caption indices, the distinct grids it needs [U, P, C], each caption's grid [N],
    which of the distinct grids are mirrored [U] or None)."""

    def __init__(self, reader: RowReader, rows: torch.Tensor, batches: list[torch.Tensor],
                 mirrored: RowReader | None = None, flips: torch.Tensor | None = None):
        self.reader, self.rows, self.batches = reader, rows, batches
        self.mirrored, self.flips = (mirrored, flips) if mirrored is not None and flips is not None else (None, None)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        idx = self.batches[i]
        unique, inverse = torch.unique(self.rows[idx], return_inverse=True)
        if self.mirrored is None:
            return idx, torch.from_numpy(self.reader.read(unique.numpy())), inverse, None
        flipped = self.flips[unique]
        grid = np.empty((len(unique), *self.reader.row_shape), dtype=self.reader.dtype)
        for reader, which in ((self.reader, ~flipped), (self.mirrored, flipped)):
            if which.any():
                grid[which.numpy()] = reader.read(unique[which].numpy())
        return idx, torch.from_numpy(grid), inverse, flipped


class GridFeatures:
    """Grid rows read from the cache file as batches need them, never the whole array.

    On CUDA, DataLoader workers read ahead into pinned memory while the GPU trains; on a CPU the
    reads (a few MB per batch, usually from the OS page cache) run in the loop itself, which leaves
    every core to the decoder.
    """

    def __init__(self, cache, device: str, workers: int | None = None, flipped=None):
        self.reader = RowReader(cache.path / "features.npy")
        self.mirrored = RowReader(flipped.path / "features.npy") if flipped is not None else None
        self.device = device
        self.cuda = device.startswith("cuda")
        self.workers = (2 if self.cuda else 0) if workers is None else workers

    def batches(self, rows: torch.Tensor, batches: list[torch.Tensor],
                flips: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, dict]]:
        loader = torch.utils.data.DataLoader(
            _GridBatches(self.reader, rows, batches, self.mirrored, flips), batch_size=None, shuffle=False,
            num_workers=self.workers, pin_memory=self.cuda, persistent_workers=False,
        )
        for idx, grid, inverse, flipped in loader:
            inputs = {"grid": grid.to(self.device, non_blocking=True),
                      "rows": inverse.to(self.device, non_blocking=True)}
            if flipped is not None:
                inputs["flipped"] = flipped[inverse]
            yield idx, inputs

    def images(self, rows: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.reader.read(rows)).to(self.device)


class TunedGrids:
    """Trunk rows seen through a fixed tuned tail: `images(rows)` gives grid rows (SCST on a fine-tuned run)."""

    def __init__(self, source: GridFeatures, tail: torch.nn.Module):
        self.source, self.tail = source, tail.eval()

    @torch.no_grad()
    def images(self, rows: list[int]) -> torch.Tensor:
        return self.tail(self.source.images(rows))


def feature_source(cache, output: str, device: str, flipped=None) -> PooledFeatures | GridFeatures:
    """The batch source for a cache of `output` rows; `flipped`: the same rows' cache of mirrored images."""
    if output == "pooled":
        return PooledFeatures(cache, device, flipped)
    return GridFeatures(cache, device, flipped=flipped)


def swap_words(tokens: torch.Tensor, flipped: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The captions of mirrored images with each pair's words swapped ("left" <-> "right")."""
    if not pairs or not bool(flipped.any()):
        return tokens
    tokens = tokens.clone()
    rows = tokens[flipped]
    swapped = rows.clone()
    for a, b in pairs:
        swapped[rows == a], swapped[rows == b] = b, a
    tokens[flipped] = swapped
    return tokens


def grouped_order(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of captions in which each image's captions are adjacent (images shuffled).

    Cut into batches, it puts most of an image's captions in one batch, where the attention decoder
    reads and encodes the image's grid once for all of them (captions per image fewer reads).
    """
    images = int(rows.max()) + 1 if len(rows) else 0
    image_rank = torch.empty(images, dtype=torch.long)
    image_rank[torch.randperm(images, generator=generator)] = torch.arange(images)
    return torch.argsort(image_rank[rows], stable=True)


def batches_for_rank(
    n: int, batch_size: int, epoch_seed: int, rank: int, world: int, groups: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """This rank's batches of caption indices; every rank gets the same number of batches.

    With `groups` (each caption's image row) the captions of one image are kept adjacent, so a batch
    holds few images with several captions each (see `capcli.train.batches.grouped_order`).
    """
    g = torch.Generator().manual_seed(epoch_seed)
    perm = torch.randperm(n, generator=g) if groups is None else grouped_order(groups, g)
    per_rank = n // world
    mine = perm[rank * per_rank : (rank + 1) * per_rank] if world > 1 else perm
    return list(mine.split(batch_size))
