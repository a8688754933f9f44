"""What the training loop feeds the decoder, batch by batch: pooled vectors from RAM, or grids from the cache file.

Both sources yield `(caption indices, decoder inputs)` where the inputs are the keyword arguments of
the decoder's forward besides the tokens: `{"features": [N, D]}` for the pooled decoder, and
`{"grid": [U, P, C], "rows": [N]}` for the attention decoder, with each image of the batch read and
encoded once however many of its captions the batch holds.
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

    def __init__(self, cache, device: str):
        feats = torch.from_numpy(np.array(cache.features))  # float16 copy in RAM; float32 per batch
        self.feats = feats.to(device) if device.startswith("cuda") else feats
        self.device = device

    def batches(self, rows: torch.Tensor, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, dict]]:
        for idx in batches:
            yield idx, {"features": self.feats[rows[idx]].to(self.device, non_blocking=True)}

    def images(self, rows: list[int]) -> torch.Tensor:
        return self.feats[rows].to(self.device)


class _GridBatches(torch.utils.data.Dataset):
    """Item i is batch i: (caption indices, the distinct grids it needs [U, P, C], each caption's grid [N])."""

    def __init__(self, reader: RowReader, rows: torch.Tensor, batches: list[torch.Tensor]):
        self.reader, self.rows, self.batches = reader, rows, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.batches[i]
        unique, inverse = torch.unique(self.rows[idx], return_inverse=True)
        return idx, torch.from_numpy(self.reader.read(unique.numpy())), inverse


class GridFeatures:
    """Grid rows read from the cache file as batches need them, never the whole array.

    On CUDA, DataLoader workers read ahead into pinned memory while the GPU trains; on a CPU the
    reads (a few MB per batch, usually from the OS page cache) run in the loop itself, which leaves
    every core to the decoder.
    """

    def __init__(self, cache, device: str, workers: int | None = None):
        self.reader = RowReader(cache.path / "features.npy")
        self.device = device
        self.cuda = device.startswith("cuda")
        self.workers = (2 if self.cuda else 0) if workers is None else workers

    def batches(self, rows: torch.Tensor, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, dict]]:
        loader = torch.utils.data.DataLoader(
            _GridBatches(self.reader, rows, batches), batch_size=None, shuffle=False,
            num_workers=self.workers, pin_memory=self.cuda, persistent_workers=False,
        )
        for idx, grid, inverse in loader:
            yield idx, {"grid": grid.to(self.device, non_blocking=True),
                        "rows": inverse.to(self.device, non_blocking=True)}

    def images(self, rows: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.reader.read(rows)).to(self.device)


def feature_source(cache, output: str, device: str) -> PooledFeatures | GridFeatures:
    return GridFeatures(cache, device) if output == "grid" else PooledFeatures(cache, device)


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
