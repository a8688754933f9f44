"""Attention heatmaps: where the decoder looked for each word, drawn over the image the model saw.

The weights alpha [P] of one word are a height x width map over the backbone's grid (row-major).
They are upsampled smoothly to the model's input crop and shown the way Xu et al. (2015) drew them:
the image dimmed where the decoder did not look and lit where it did. numpy and Pillow only.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from capcli.backbone import Preprocessing
from capcli.images import load_input

DIM = 0.3  # brightness kept where the decoder did not look at all


def model_view(image, prep: Preprocessing) -> np.ndarray:
    """The resized, centre-cropped image the backbone saw, uint8 [S, S, 3] (its normalisation undone)."""
    arr = load_input(image, prep).transpose(1, 2, 0)
    rgb = arr * np.asarray(prep.std, np.float32) + np.asarray(prep.mean, np.float32)
    return (np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def upsample(alpha: np.ndarray, grid: tuple[int, int], size: int) -> np.ndarray:
    """One word's weights [H*W] -> a smooth map [size, size] scaled to [0, 1] (its peak is 1)."""
    height, width = grid
    cells = np.asarray(alpha, np.float32).reshape(height, width)
    peak = float(cells.max())
    cells = cells / peak if peak > 0 else cells
    smooth = Image.fromarray(cells).resize((size, size), Image.Resampling.BICUBIC)  # float32: mode "F"
    # 8 bits are plenty for a picture, and Pillow blurs only those: the blur removes the grid's
    # blockiness, as the paper's upsample-and-smooth does.
    levels = Image.fromarray((np.clip(np.asarray(smooth), 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    radius = size / max(height, width) / 2
    if radius >= 1:
        levels = levels.filter(ImageFilter.GaussianBlur(radius))
    heat = np.asarray(levels, np.float32) / 255.0
    return heat / heat.max() if heat.max() > 0 else heat


def overlay(view: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image lit by a [0, 1] map: DIM of its brightness where the map is 0, all of it (and a glow) at 1."""
    light = DIM + (1.0 - DIM) * heat[..., None]
    glow = 60.0 * heat[..., None] ** 2  # a white sheen on the most attended region
    return np.clip(view.astype(np.float32) * light + glow, 0, 255).astype(np.uint8)


def word_maps(image, attention, grid: tuple[int, int], prep: Preprocessing, size: int = 128) -> list[tuple[str, str]]:
    """For each (word, alpha): the word and a base64 JPEG of its heatmap over the image, `size` px square."""
    view = np.asarray(Image.fromarray(model_view(image, prep)).resize((size, size), Image.Resampling.BICUBIC))
    return [(word, _jpeg(overlay(view, upsample(alpha, grid, size)))) for word, alpha in attention]


def model_view_jpeg(image, prep: Preprocessing, size: int = 128, grid: tuple[int, int] | None = None) -> str:
    """The image as the model saw it, base64 JPEG; with `grid`, the grid's cells drawn faintly over it."""
    picture = Image.fromarray(model_view(image, prep)).resize((size, size), Image.Resampling.BICUBIC)
    if grid is not None:
        draw = ImageDraw.Draw(picture)
        height, width = grid
        for i in range(1, width):
            draw.line([(i * size / width, 0), (i * size / width, size)], fill=(255, 255, 255), width=1)
        for j in range(1, height):
            draw.line([(0, j * size / height), (size, j * size / height)], fill=(255, 255, 255), width=1)
    return _jpeg(np.asarray(picture))


def _jpeg(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=88)
    return base64.b64encode(buf.getvalue()).decode("ascii")
