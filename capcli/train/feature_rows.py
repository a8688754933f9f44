"""Reading rows of a feature cache file without keeping them in memory: what training on grids needs.

A grid cache is [N, P, C] float16 (Flickr8k on resnet152: 1.6 GB; COCO: ~25 GB). Indexing an
`np.memmap` would keep every page it touched mapped into the process (they count in its resident
memory until unmapped), so a training epoch would end up holding the whole file. Positional reads
(`os.preadv`) into a fresh batch array leave the file to the OS page cache, which the kernel can
drop at will: the process holds one batch at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from capcli.errors import CapcliError


class RowReader:
    """Rows of a C-ordered .npy file, read on demand: `reader.read([5, 2, 9])` -> array [3, *row_shape]."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
                np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order or dtype.hasobject or not shape:
            raise CapcliError(f"{self.path}: not a C-ordered numeric array of rows")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        if self.path.stat().st_size < expected:
            raise CapcliError(f"{self.path}: truncated ({self.path.stat().st_size} bytes, {expected} expected)")
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        # One descriptor per process: DataLoader workers re-open instead of sharing the parent's.
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, rows) -> np.ndarray:
        """The given rows (any order, repeats allowed) as a new array [len(rows), *row_shape]."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        out = np.empty((rows.size, *self.row_shape), dtype=self.dtype)
        fd = self._descriptor()
        for i, row in enumerate(rows.tolist()):
            buffer = memoryview(out[i]).cast("B")
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [buffer], self.offset + row * self.row_bytes)
            else:  # Windows: no positional reads; a seek is fine, each process has its own descriptor
                os.lseek(fd, self.offset + row * self.row_bytes, os.SEEK_SET)
                got = os.readv(fd, [buffer]) if hasattr(os, "readv") else _read_into(fd, buffer)
            if got != self.row_bytes:
                raise CapcliError(f"{self.path}: short read at row {row}; is the cache file damaged?")
        return out

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _read_into(fd: int, buffer: memoryview) -> int:
    data = os.read(fd, len(buffer))
    buffer[: len(data)] = data
    return len(data)
