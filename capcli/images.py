"""Reading images safely and turning them into backbone input, with numpy and Pillow only.

The same code feeds training-time feature extraction and ONNX Runtime captioning, so both see
identical pixels.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from capcli.backbone import Preprocessing
from capcli.errors import CapcliError

# Pillow's own default (about 89 megapixels); above twice that Pillow raises, between it warns:
# we refuse both, since a caption never needs more than a few megapixels.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# A backbone sees the square centre crop of the image (only that crop is resampled: to_pixels), i.e. at
# most 1/ratio of it. Panoramas stay well under this ratio; strips beyond it are refused.
MAX_ASPECT_RATIO = 50
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageError(CapcliError):
    """An image that cannot be used: missing, not an image, truncated, or too large."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of letting convert() clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(_float_to_8bit(np.asarray(img, dtype=np.float64)), mode="L").convert("RGB")
    if _transparent(img):
        # Transparent areas become white, as a viewer would show them. Pasting through the alpha onto a white
        # RGB image gives alpha_composite's pixels with two full-size images alive instead of five.
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, (0, 0), rgba)
        return white
    return img.convert("RGB")


def _transparent(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


# Bytes per pixel Pillow holds in memory: 8-bit images with several bands are stored as 4 bytes a pixel.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Bytes per pixel alive at once while _to_rgb turns a decoded image into RGB, on top of the decoded image:
# float images go through float64 arrays (the array, a temporary or two, the 8-bit result, L and RGB images).
_FLOAT_WORK_BYTES = 48
_CONVERT_WORK_BYTES = 4  # the RGB copy


def decode_cost(img: Image.Image) -> int:
    """Peak bytes of memory that decoding `img` and turning it into RGB takes, from its header alone (before a
    pixel is decoded): pixels x bytes per pixel of the decoded image, of an EXIF turn and of the conversion."""
    pixels = img.width * img.height
    stored = _STORED_BYTES.get(img.mode, 4)
    turned = stored if _may_turn(img) else 0
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        work = _FLOAT_WORK_BYTES
    elif _transparent(img):  # the white RGB image, and the RGBA conversion when not RGBA already
        work = _CONVERT_WORK_BYTES + (0 if img.mode == "RGBA" else 4)
    else:
        work = _CONVERT_WORK_BYTES
    return pixels * (stored + turned + work)


def _float_to_8bit(arr: np.ndarray) -> np.ndarray:
    """A float image stretched over its finite values' range; NaN shows as black, infinities as the extremes.
    An image with no finite value has nothing to show (and would only give numpy's warnings)."""
    finite = np.isfinite(arr)
    if not finite.any():
        raise ImageError("a floating-point image with no finite pixel value (all NaN or infinite)")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    with np.errstate(over="ignore", invalid="ignore"):  # a range wider than float64 holds: hi - lo overflows
        scaled = (np.clip(np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo), lo, hi) - lo) / ((hi - lo) or 1.0)
    return np.clip(np.nan_to_num(scaled * 255, nan=0.0), 0, 255).astype(np.uint8)


def check_size(width: int, height: int) -> None:
    """Refuse, before any pixel is decoded, an image too costly to decode or too elongated to crop."""
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageError(f"image too large ({width}x{height}), refused as a decompression bomb")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"image too elongated ({width}x{height}, more than {MAX_ASPECT_RATIO}:1): the square centre crop "
            "a backbone sees would hold almost none of it; refused"
        )


# Formats whose orientation tags Pillow keeps in `info`: without those keys there is nothing to turn.
_ORIENTATION_IN_INFO = {"JPEG", "MPO", "PNG", "WEBP"}
_ORIENTATION_KEYS = ("exif", "xmp", "XML:com.adobe.xmp")


def _may_turn(img: Image.Image) -> bool:
    return not (img.format in _ORIENTATION_IN_INFO and not any(k in img.info for k in _ORIENTATION_KEYS))


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF (or XMP) orientation says. Parsing EXIF that is not there costs as much as
    decoding a small JPEG, so formats that would carry it in `info` skip the parse when it is absent."""
    if not _may_turn(img):
        return img
    return ImageOps.exif_transpose(img) or img


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, upright per its EXIF orientation; ImageError if unusable."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    with _reading(str(path)), Image.open(path) as img:
        check_size(img.width, img.height)
        img.load()
        return _to_rgb(_upright(img))


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
    """Every way an image can be unusable while it is opened and decoded, as one ImageError naming `where`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError as exc:
        raise ImageError(f"{where}: {exc}") from None
    except MemoryError:
        raise ImageError(f"{where}: not enough memory to decode this image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{where}: image too large, refused as a decompression bomb") from None
    except OSError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "cannot identify image file" in msg:
            raise ImageError(f"{where}: not an image") from None
        raise ImageError(f"{where}: unreadable image ({msg})") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageError(f"{where}: unreadable image ({type(exc).__name__})") from None


Reserve = Callable[[int], contextlib.AbstractContextManager]


def decode_pixels(source: IO[bytes], where: str, prep: Preprocessing, reserve: Reserve | None = None) -> np.ndarray:
    """An image file object resized and centre-cropped: uint8 [S, S, 3], as load_pixels gives for a path.

    `reserve(bytes)` is entered with decode_cost, read from the header, before any pixel is decoded, and left
    once the full-size images are freed: a server holds it to bound the memory of its concurrent decodes."""
    with _reading(where), Image.open(source) as img:
        check_size(img.width, img.height)
        with reserve(decode_cost(img)) if reserve else contextlib.nullcontext():
            img.load()
            pixels = to_pixels(_to_rgb(_upright(img)), prep)  # the full-size RGB copy is freed right here
            img.close()  # and the decoded one, before the reservation ends
            return pixels


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def to_pixels(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize (the shorter side to `prep.resize`, or with resize_mode 'squash' both sides) and centre-crop:
    uint8 [S, S, 3], the pixels before normalisation; ImageError if too costly.

    Only the crop is resampled (Pillow's `box`: the crop's area of the source, same scale and filter), which
    halves the cost of the usual resize-everything-then-crop when the resize enlarges. The pixels are those of
    resizing then cropping up to rounding: the same on the synthetic images at 224/256, at most 2 grey levels
    apart on < 1 % of the pixels of the photos in tests/images (Pillow may run its two passes in the other
    order, rounding in between differently)."""
    w, h = img.size
    check_size(w, h)
    if prep.resize_mode == "squash":
        new_w = new_h = prep.resize
    else:
        scale = prep.resize / min(w, h)
        new_w, new_h = max(prep.input_size, round(w * scale)), max(prep.input_size, round(h * scale))
    size = prep.input_size
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = new_w / w, new_h / h  # the scale actually applied, after rounding to whole pixels
    try:
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        return np.asarray(img.resize((size, size), RESAMPLE[prep.interpolation], box=box))
    except MemoryError:
        raise ImageError(f"not enough memory to resize this {w}x{h} image to {new_w}x{new_h}") from None


def normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 [S, S, 3] -> float32 [3, S, S], scaled to [0, 1] and normalised with the backbone's mean/std."""
    arr = pixels.astype(np.float32) / 255.0
    arr = (arr - np.asarray(prep.mean, dtype=np.float32)) / np.asarray(prep.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_input(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize (as `to_pixels`), centre-crop and normalise: float32 [3, S, S]; ImageError if too costly."""
    return normalise(to_pixels(img, prep), prep)


def load_input(path: str | Path, prep: Preprocessing) -> np.ndarray:
    """An image file as backbone input; every way it can be unusable is an ImageError naming it."""
    return normalise(load_pixels(path, prep), prep)


def load_pixels(path: str | Path, prep: Preprocessing) -> np.ndarray:
    """An image file resized and centre-cropped, not yet normalised: uint8 [S, S, 3]; an ImageError naming it
    when unusable."""
    img = load_rgb(path)
    try:
        return to_pixels(img, prep)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


RESIZE_SAMPLE = 200  # training images whose headers decide an automatic resize mode


def auto_resize_mode(paths: list[Path], sample: int = RESIZE_SAMPLE) -> tuple[str, str]:
    """The resize mode for a model trained on `paths`, and why: 'squash' when every image looked at (up to
    `sample`, spread evenly, headers only) is square, 'crop' otherwise.

    Square training photos are almost always copies squashed (or cropped) to a square ahead of training; with
    'squash' a user's photo of any shape is framed as such a copy would frame it, whole, and on square images
    the two modes give the same pixels, so the choice changes nothing the model was trained on. Photos of
    varied shapes keep ImageNet's framing ('crop'), which their features were then extracted with."""
    step = max(1, len(paths) // sample)
    sizes = []
    for path in paths[::step][:sample]:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (OSError, ValueError, SyntaxError):
            continue  # unreadable images are reported by the extraction
    if sizes and all(w == h for w, h in sizes):
        return "squash", f"all {len(sizes)} training images looked at are square"
    square = sum(w == h for w, h in sizes)
    return "crop", f"{square} of {len(sizes)} training images looked at are square"


def resize_mode_for(requested: str, dataset) -> tuple[str, str | None]:
    """The resize mode to train `dataset` with: `requested`, or for 'auto' the choice from its training images,
    with a note saying why (None when it was given)."""
    if requested != "auto":
        return requested, None
    mode, why = auto_resize_mode([dataset.image_path(name) for name in dataset.splits.get("train", [])])
    return mode, f"resize mode {mode} ({why}; --resize-mode sets it)"


def expand_image_args(args: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted) and globs -> (image paths, problems for missing args)."""
    import glob

    found: list[Path] = []
    problems: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif any(ch in arg for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                problems.append(f"{arg}: no file matches")
            found.extend(matches)
        else:
            found.append(path)  # missing files are reported when loaded, in order
    return found, problems


class InMemoryImage:
    """A Pillow image or a numpy array given instead of a file, with the name its result and errors go by."""

    __slots__ = ("image", "name")

    def __init__(self, name: str, image: Image.Image | np.ndarray) -> None:
        self.name, self.image = name, image

    def __str__(self) -> str:
        return self.name


def source_input(source: str | Path | InMemoryImage, prep: Preprocessing) -> np.ndarray:
    """An image file or an in-memory image as backbone input, float32 [3, S, S]: a Pillow image is turned upright
    and made RGB as a file's pixels are; every way it can be unusable is an ImageError naming it."""
    if not isinstance(source, InMemoryImage):
        return load_input(source, prep)
    with _reading(source.name):
        img = source.image if isinstance(source.image, Image.Image) else array_image(source.image)
        check_size(img.width, img.height)
        img.load()
        return to_input(_to_rgb(_upright(img)), prep)


def array_image(array: np.ndarray) -> Image.Image:
    """A numpy image, channels last ([H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA), uint8 from 0 to 255 or float
    from 0.0 to 1.0, as a Pillow image; an ImageError for any other shape, type or value."""
    if not isinstance(array, np.ndarray):
        raise ImageError(f"not an image: a {type(array).__name__}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageError(f"an array image is [H, W], [H, W, 3] or [H, W, 4], channels last; not {list(array.shape)}")
    check_size(array.shape[1], array.shape[0])
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError("a float array image holds values from 0.0 to 1.0 (use uint8 for 0 to 255)")
        array = (array * 255 + 0.5).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ImageError(f"an array image is uint8 (0 to 255) or float (0.0 to 1.0), not {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))
