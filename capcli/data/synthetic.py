"""The embedded synthetic dataset: coloured shapes on plain backgrounds (with a camera's pixel noise), with
captions that are checkably right or wrong.

Written in the Kaggle Flickr8k layout (`Images/*.jpg`, `captions.txt` with header `image,caption`)
plus `objects.json`, the ground truth each caption is drawn from. Every caption names objects as
"<size?> <colour> <shape>" and mentions the largest object first, so that a model trained for a
few minutes on a CPU can learn to name colour and shape, and `caption_is_correct` can score it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from capcli.data.text import tokenize
from capcli.errors import CapcliError
from capcli.paths import atomic_write_json, atomic_write_text, cache_root, make_temp_folder, staging_folder

SYNTHETIC_FORMAT = "capcli-synthetic/3"  # bump when scenes, pixels or captions change

# Saturated colours far apart in hue, and none of them a background colour.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = ("white", "black", "gray")
COUNT_WORDS = ("one", "two", "three")

_RGB = {
    "red": (215, 35, 35),
    "green": (30, 165, 60),
    "blue": (40, 85, 225),
    "yellow": (245, 215, 30),
    "purple": (145, 60, 195),
    "orange": (245, 135, 25),
}
_BACKGROUND_RGB = {"white": (250, 250, 250), "black": (18, 18, 18), "gray": (128, 128, 128)}

# Object centres as fractions of the image side, and radii of the circle each shape fits in.
# Centre +- radius (+ jitter) stays inside [0.065, 0.935]: images are centre-cropped after resizing
# the shorter side to 256/224 of the crop, which cuts ~6% off each border.
_SLOT_CENTRES = {
    "left": (0.27, 0.50),
    "right": (0.73, 0.50),
    "top": (0.50, 0.27),
    "bottom": (0.50, 0.73),
    "centre": (0.50, 0.50),
}
# In a scene of several objects the main (first named) one is large and the others small, so the
# main object dominates pooled CNN features the way a photo's subject does.
_RADIUS = {"small": 0.075, "large": 0.19}
_JITTER = 0.015
_GAP = 0.03  # minimum space between two objects' circles
# Pixel noise like a camera's (std in grey levels). On perfectly flat images a decoder learns features that
# half a grey level of noise upsets (86 % of captions changed, CIDEr-D 465 -> 334 in one measurement), so
# int8 encoders and real photos threw it off; trained on noisy pixels it was also right more often.
_PIXEL_NOISE = 3.0
# Drawn as a discretised normal: 256 equally likely values (its quantiles) picked by random bytes, ten times
# faster than drawing floats; pixels are rounded to whole grey levels anyway.
_NOISE_LEVELS = np.array([NormalDist(0.0, _PIXEL_NOISE).inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)
_JPEG_QUALITY = 95

_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
CAPTIONS_PER_IMAGE = 5
DEFAULT_IMAGES = 10_000


# ---------------------------------------------------------------- scenes


def _sample_objects(rng: np.random.Generator, size: int) -> list[dict[str, Any]]:
    """1-3 objects with distinct (colour, shape) pairs in distinct, non-overlapping slots, largest first.

    A single object is small or large; with several, the first is large and the rest small.
    """
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    while True:
        sizes = [str(rng.choice(SIZES))] if n == 1 else ["large"] + ["small"] * (n - 1)
        slots = rng.choice(POSITIONS, size=n, replace=False)
        objects = [_sample_object(rng, str(slot), sz) for slot, sz in zip(slots, sizes, strict=True)]
        pairs = {(o["colour"], o["shape"]) for o in objects}
        if len(pairs) == n and not _any_overlap(objects):
            break
    objects.sort(key=lambda o: -o["r"])  # stable: equal sizes keep their sampled order
    for o in objects:
        o["centre"] = [round(o.pop("x") * size, 2), round(o.pop("y") * size, 2)]
        o["radius"] = round(o.pop("r") * size, 2)
    return objects


def _sample_object(rng: np.random.Generator, slot: str, size: str) -> dict[str, Any]:
    cx, cy = _SLOT_CENTRES[slot]
    jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
    return {
        "colour": str(rng.choice(COLOURS)),
        "shape": str(rng.choice(SHAPES)),
        "size": size,
        "position": slot,
        "x": cx + float(jx),
        "y": cy + float(jy),
        "r": _RADIUS[size],
    }


def _any_overlap(objects: list[dict[str, Any]]) -> bool:
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            if math.hypot(a["x"] - b["x"], a["y"] - b["y"]) < a["r"] + b["r"] + _GAP:
                return True
    return False


# ---------------------------------------------------------------- drawing


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    # A little colour variation so a model learns colour names, not exact pixel values.
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + noise, 0, 255))  # type: ignore[return-value]


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.78
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        # Equilateral, pointing up, its centroid on the centre.
        draw.polygon(
            [
                (cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ],
            fill=fill,
        )
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    elif shape == "cross":
        arm, half = r * 0.9, r * 0.36  # thick arms: enough area to show the colour
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def _render(background: str, objects: list[dict[str, Any]], size: int, rng: np.random.Generator,
            noise: np.random.Generator) -> bytes:
    img = Image.new("RGB", (size, size), _jittered(_BACKGROUND_RGB[background], rng, 6))
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy = o["centre"]
        _draw_shape(draw, o["shape"], cx, cy, o["radius"], _jittered(_RGB[o["colour"]], rng, 15))
    pixels = np.asarray(img, dtype=np.float32) + _NOISE_LEVELS[noise.integers(0, 256, (size, size, 3), np.uint8)]
    buf = io.BytesIO()
    # JPEG as photos are: 20x faster to write than PNG once the pixels are noisy, and the same bytes every run.
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                            quality=_JPEG_QUALITY)
    return buf.getvalue()


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: dict[str, Any], with_size: bool) -> str:
    words = [o["size"], o["colour"], o["shape"]] if with_size else [o["colour"], o["shape"]]
    return f"{_article(words[0])} {' '.join(words)}"


def _joined(phrases: list[str]) -> str:
    """ "x", "x and y", "x, y and z"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _listing(objects: list[dict[str, Any]], with_size: bool) -> str:
    return _joined([_noun_phrase(o, with_size) for o in objects])


def _relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where a is relative to b, along the axis on which they are further apart."""
    dx = b["centre"][0] - a["centre"][0]
    dy = b["centre"][1] - a["centre"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _candidate_captions(
    background: str, objects: list[dict[str, Any]], rng: np.random.Generator
) -> list[str]:
    """Every wording this scene can have; all of them true of the image."""
    first = objects[0]
    sized = bool(rng.integers(2))
    on_bg = f"on a {background} background"
    located = _joined([f"{_noun_phrase(o, False)} {_POSITION_PHRASES[o['position']]}" for o in objects])
    candidates = [
        f"{_listing(objects, True)} {on_bg}",
        f"there is {_listing(objects, sized)}",
        f"a {background} background with {_listing(objects, not sized)}",
        f"a picture of {_listing(objects, sized)}",
        located,
        _listing(objects, False),
    ]
    if len(objects) == 1:
        candidates += [
            f"{_noun_phrase(first, True)} {_POSITION_PHRASES[first['position']]}",
            f"a single {first['colour']} {first['shape']} {on_bg}",
            f"one {first['size']} {first['colour']} {first['shape']}",
        ]
    else:
        second = objects[1]
        count = COUNT_WORDS[len(objects) - 1]
        candidates += [
            f"{_noun_phrase(first, sized)} {_relation(first, second)} {_noun_phrase(second, sized)}",
            f"{count} shapes: {_listing(objects, False)}",
            f"{count} shapes {on_bg}: {_listing(objects, True)}",
        ]
    return candidates


def _captions(background: str, objects: list[dict[str, Any]], rng: np.random.Generator) -> list[str]:
    candidates = _candidate_captions(background, objects, rng)
    # The full description first, then four other distinct wordings in a random order.
    rest = [c for c in dict.fromkeys(candidates[1:]) if c != candidates[0]]
    picks = rng.choice(len(rest), size=CAPTIONS_PER_IMAGE - 1, replace=False)
    return [candidates[0], *(rest[int(i)] for i in picks)]


# ---------------------------------------------------------------- checking captions

_COLOUR_WORDS = frozenset(COLOURS + BACKGROUNDS + ("grey", "brown", "pink"))
_SHAPE_FORMS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "crosses": "cross"}
# Words that end a noun phrase: a colour followed by one of these names no shape.
_PHRASE_BREAKS = frozenset(
    "a an the and or on of to with in at is are there background shapes shape image picture "
    "left right top bottom centre center above below next".split()
)
_MAX_WORDS_BETWEEN = 2  # e.g. "red large circle", "red big shiny star"


def named_pairs(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order.

    "a big red circle and a blue square" -> [("red", "circle"), ("blue", "square")]. Background
    colours count as colours, so "a white square" is a named pair (and wrong on these images).
    """
    words = tokenize(caption)
    pairs = []
    for i, word in enumerate(words):
        if word not in _COLOUR_WORDS:
            continue
        for following in words[i + 1 : i + 2 + _MAX_WORDS_BETWEEN]:
            if following in _SHAPE_FORMS:
                pairs.append((word, _SHAPE_FORMS[following]))
                break
            if following in _COLOUR_WORDS or following in _PHRASE_BREAKS:
                break
    return pairs


def caption_is_correct(caption: str, objects: list[dict]) -> bool:
    """True iff the caption names at least one (colour, shape) pair and every one it names is drawn."""
    pairs = named_pairs(caption)
    drawn = {(o["colour"], o["shape"]) for o in objects}
    return bool(pairs) and all(pair in drawn for pair in pairs)


def main_object_is_correct(caption: str, objects: list[dict]) -> bool:
    """True iff the first (colour, shape) pair the caption names is the largest object's.

    Reference captions always name the largest object first, so this asks whether the model got
    the image's main object right, whatever it says about the smaller ones.
    """
    pairs = named_pairs(caption)
    return bool(pairs) and bool(objects) and pairs[0] == (objects[0]["colour"], objects[0]["shape"])


# ---------------------------------------------------------------- files


def image_name(index: int) -> str:
    return f"synth_{index:05d}.jpg"


def _scene(seed: int, index: int, size: int) -> tuple[str, list[dict[str, Any]], bytes, list[str]]:
    # One generator per image: image i is the same whatever n_images is.
    rng = np.random.default_rng([seed, index])
    background = str(rng.choice(BACKGROUNDS))
    objects = _sample_objects(rng, size)
    # The pixel noise has its own generator: scenes and captions are those of format 2.
    image = _render(background, objects, size, rng, np.random.default_rng([seed, index, 1]))
    return background, objects, image, _captions(background, objects, rng)


def generate(
    out: Path,
    n_images: int = 1500,
    seed: int = 0,
    size: int = 224,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Write the synthetic set into `out`; `progress` is called with the number of images written so far.

    `workers` threads draw the images (None: one per core for a large set); the bytes are the same
    for any number of them, since every image has its own random generators.
    """
    if n_images < 1:
        raise CapcliError(f"the synthetic set needs at least 1 image, got {n_images}")
    if size < 32:
        raise CapcliError(f"synthetic images must be at least 32 pixels wide, got {size}")
    out = Path(out)
    images_dir = out / "Images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    scenes: dict[str, Any] = {}
    # An error or Ctrl-C here stops the drawing threads (pending chunks cancelled) before it propagates.
    with contextlib.closing(_drawn_scenes(seed, n_images, size, workers)) as drawn:
        for index, (background, objects, image, captions) in enumerate(drawn):
            name = image_name(index)
            (images_dir / name).write_bytes(image)
            rows.extend((name, caption) for caption in captions)
            scenes[name] = {"background": background, "objects": objects}
            if progress is not None:
                progress(index + 1)
    atomic_write_text(out / "captions.txt", _captions_csv(rows))
    # objects.json last: its presence marks a complete set.
    atomic_write_json(
        out / "objects.json",
        {"format": SYNTHETIC_FORMAT, "seed": seed, "n_images": n_images, "size": size, "images": scenes},
    )
    return out


# Drawing and JPEG-encoding an image takes ~3 ms; a thread is worth its start-up from a few hundred images on.
_IMAGES_PER_WORKER = 500
_CHUNK = 50


def generation_workers(n_images: int) -> int:
    """Threads that draw a set of `n_images` by default: one per core, each with enough images to be worth it."""
    return max(1, min(os.cpu_count() or 1, n_images // _IMAGES_PER_WORKER))


def _drawn_scenes(seed: int, n_images: int, size: int, workers: int | None) -> Iterator[tuple]:
    """(background, objects, JPEG bytes, captions) of images 0..n_images-1, in order."""
    workers = generation_workers(n_images) if workers is None else workers
    if workers <= 1:
        yield from (_scene(seed, index, size) for index in range(n_images))
        return
    from concurrent.futures import ThreadPoolExecutor

    # Threads, not processes: NumPy and Pillow release the GIL for the pixel work and JPEG encoding,
    # and threads need no import guard in the caller's script nor a second copy of anything.
    with ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(_scene_chunk, seed, start, min(start + _CHUNK, n_images), size)
                for start in range(0, n_images, _CHUNK)]
        try:
            for job in jobs:
                yield from job.result()
        finally:
            for job in jobs:
                job.cancel()


def _scene_chunk(seed: int, start: int, stop: int, size: int) -> list[tuple]:
    return [_scene(seed, index, size) for index in range(start, stop)]


def _captions_csv(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("image", "caption"))
    writer.writerows(rows)
    return buf.getvalue()


def is_synthetic_set(path: Path) -> bool:
    """Whether `path` holds a complete set written by `generate`."""
    return synthetic_set(path) is not None


def synthetic_set(path: Path) -> dict | None:
    """objects.json of the complete set written by `generate` at `path`, or None."""
    try:
        meta = json.loads((Path(path) / "objects.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == SYNTHETIC_FORMAT else None


SET_FILES = ("Images", "captions.txt", "objects.json")


def foreign_files(path: Path, meta: dict) -> list[str]:
    """What is in the set's folder that `generate` did not write there (a user's notes, a run, more images)."""
    path = Path(path)
    found = [p.name for p in path.iterdir() if p.name not in SET_FILES]
    images = meta.get("images") if isinstance(meta.get("images"), dict) else {}
    if (path / "Images").is_dir():
        found += [f"Images/{p.name}" for p in (path / "Images").iterdir() if p.name not in images]
    return sorted(found)


def build(
    out: Path,
    n_images: int = 1500,
    seed: int = 0,
    size: int = 224,
    progress: Callable[[int], None] | None = None,
    replace: bool = True,
) -> Path:
    """Generate into a temporary folder beside `out`, then move it into place.

    An interrupted run never leaves a half dataset at `out`. With replace=False an existing
    complete set at `out` (say, written meanwhile by another process) is kept.
    """
    out = Path(out)
    # Beside `out` (the rename stays atomic), named .NAME.PID.*.tmp: those of killed runs are removed here.
    tmp = staging_folder(out.parent, out.name)  # becomes the user's folder: umask perms
    try:
        generate(tmp, n_images, seed, size, progress)
        _move_into_place(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    try:
        os.replace(tmp, out)  # works when `out` is absent or an empty folder
        return
    except OSError:
        if not out.is_dir():
            raise
    if not replace and is_synthetic_set(out):
        return
    old = make_temp_folder(out.parent, prefix=f".{out.name}.", suffix=".old")
    os.replace(out, old / "set")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def default_synthetic_path(n_images: int = DEFAULT_IMAGES, seed: int = 0) -> Path:
    version = SYNTHETIC_FORMAT.rsplit("/", 1)[1]  # a new generator never reuses an old cache
    return cache_root() / "datasets" / f"synthetic-v{version}-s{seed}-n{n_images}"


def default_synthetic(
    n_images: int = DEFAULT_IMAGES, seed: int = 0, progress: Callable[[int], None] | None = None
) -> Path:
    """The synthetic set in the cache, generated on first use."""
    path = default_synthetic_path(n_images, seed)
    if not is_synthetic_set(path):
        build(path, n_images, seed, progress=progress, replace=False)
    return path


def load_objects(root: Path) -> dict[str, list[dict]]:
    """Image name -> its objects ({"colour", "shape", "size", "position", ...}) from objects.json."""
    path = Path(root) / "objects.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CapcliError(f"{path}: no such file (not a synthetic dataset?)") from None
    except (OSError, ValueError) as exc:
        raise CapcliError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != SYNTHETIC_FORMAT:
        raise CapcliError(f"{path}: not a capcli synthetic dataset")
    return {name: scene["objects"] for name, scene in meta["images"].items()}
