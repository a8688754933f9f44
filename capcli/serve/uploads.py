"""Uploaded image bytes -> backbone input, through the same loader the CLI uses (capcli.images).

The loader reads files, so each upload goes through a private temporary file; its messages name that file,
which is swapped back for the name the client gave.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from capcli.backbone import Preprocessing
from capcli.images import ImageError, load_rgb, to_input


class UploadError(Exception):
    """A request the client must fix; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def display_name(filename: str | None, index: int) -> str:
    """The client's file name, printable and short, or its position in the request."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable())[:200]
    return name or f"image {index + 1}"


def check_size(name: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise UploadError(f"{name}: empty file")
    if size > max_bytes:
        raise UploadError(f"{name}: {size / 1e6:.1f} MB is over the limit of {max_bytes / 1e6:g} MB per image", 413)


def image_input(data: bytes, name: str, prep: Preprocessing) -> np.ndarray:
    """Decode one upload into a float32 [3, S, S] array; UploadError (400) names what is wrong with it."""
    with tempfile.TemporaryDirectory(prefix="capcli-upload-") as folder:
        path = Path(folder) / "upload"
        path.write_bytes(data)
        try:
            return to_input(load_rgb(path), prep)
        except ImageError as exc:
            raise UploadError(str(exc).replace(str(path), name)) from None
