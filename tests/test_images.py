"""Images of any mode become upright 8-bit RGB; unusable ones raise ImageError with the file named."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capcli import images
from capcli.backbone import Preprocessing
from capcli.images import ImageError, expand_image_args, load_input, load_rgb, to_input, to_pixels

TEST_IMAGES = Path(__file__).parent / "images"


def save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (20, 10), 128),
        lambda: Image.new("RGBA", (20, 10), (255, 0, 0, 255)),
        lambda: Image.new("RGB", (20, 10), (0, 255, 0)).convert("P"),
        lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)),
        lambda: Image.new("1", (20, 10), 1),
        lambda: Image.new("LA", (20, 10), (50, 255)),
    ],
    ids=["gray", "rgba", "palette", "cmyk", "bilevel", "gray-alpha"],
)
def test_modes_become_rgb(tmp_path, make):
    img = make()
    suffix = ".jpg" if img.mode == "CMYK" else ".png"
    out = load_rgb(save(img, tmp_path / f"x{suffix}"))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid-gray in 16 bits
    path = save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    value = np.asarray(load_rgb(path))[0, 0, 0]
    assert 120 <= value <= 135


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert tuple(np.asarray(load_rgb(save(img, tmp_path / "t.png")))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_exif_orientation_is_respected(tmp_path, suffix):
    img = Image.new("RGB", (30, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(img, tmp_path / f"rot{suffix}", exif=exif.tobytes())
    assert load_rgb(path).size == (10, 30)
    assert load_rgb(save(img, tmp_path / f"plain{suffix}")).size == (30, 10)


def test_xmp_orientation_is_respected(tmp_path):
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b'</x:xmpmeta>')
    path = save(Image.new("RGB", (30, 10), (200, 0, 0)), tmp_path / "rot.jpg", xmp=xmp)
    assert load_rgb(path).size == (10, 30)


def _resize_then_crop(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    w, h = img.size
    scale = prep.resize / min(w, h)
    new_w, new_h = max(prep.input_size, round(w * scale)), max(prep.input_size, round(h * scale))
    left, top = (new_w - prep.input_size) // 2, (new_h - prep.input_size) // 2
    big = img.resize((new_w, new_h), images.RESAMPLE[prep.interpolation])
    return np.asarray(big.crop((left, top, left + prep.input_size, top + prep.input_size)))


@pytest.mark.parametrize("prep", [Preprocessing(224, 256), Preprocessing(299, 342),
                                  Preprocessing(224, 256, interpolation="bicubic"), Preprocessing(32, 36)])
def test_resampling_only_the_crop_gives_the_pixels_of_resizing_then_cropping(prep, small_synthetic):
    photos = sorted(TEST_IMAGES.glob("*.jpg")) + sorted((small_synthetic / "Images").glob("*.jpg"))[:5]
    for path in photos:  # rounding apart, at most
        img = load_rgb(path)
        diff = np.abs(to_pixels(img, prep).astype(int) - _resize_then_crop(img, prep))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (path.name, diff.max(), (diff > 0).mean())
        if img.size == (224, 224) and prep.input_size == 224:  # the synthetic images at 224/256: identical
            assert diff.max() == 0


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (200, 200)), tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match="big.png: image too large"):
        load_rgb(path)


@pytest.mark.parametrize(
    ("content", "message"), [(b"not an image at all", "not an image"), (None, "no such file")]
)
def test_unusable_files_name_themselves(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=f"bad.jpg: {message}"):
        load_rgb(path)


def test_truncated_image_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    path = save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageError, match="cut.png"):
        load_rgb(path)


def test_to_input_resizes_crops_and_normalises():
    prep = Preprocessing(input_size=8, resize=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    x = to_input(img, prep)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    assert np.allclose(x[0], 1.0) and np.allclose(x[1], -1.0) and abs(x[2, 0, 0] - (128 / 255 - 0.5) / 0.5) < 1e-6


def test_load_input_matches_to_input(tmp_path):
    prep = Preprocessing(input_size=16, resize=18)
    path = save(Image.new("RGB", (30, 25), (10, 20, 30)), tmp_path / "a.png")
    assert np.array_equal(load_input(path, prep), to_input(load_rgb(path), prep))


def test_expand_image_args_files_folders_globs(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"x")
    found, problems = expand_image_args([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "none*.jpg")])
    names = [p.name for p in found]
    assert names == ["a.jpg", "b.png", "c.png", "b.png"]
    assert problems == [f"{tmp_path / 'none*.jpg'}: no file matches"]


# --- issue 9, item 4: images that expand in memory are one ImageError, refused before allocating -----


def _strip(tmp_path, width, height):
    """A tiny file of a huge image: Pillow writes a blank strip in a few hundred bytes."""
    path = tmp_path / f"strip_{width}x{height}.png"
    Image.new("L", (width, height)).save(path)
    assert path.stat().st_size < 10_000
    return path


@pytest.mark.parametrize(("width", "height"), [(60_000, 2), (2_000_000, 1), (3, 60_000)])
def test_item4_elongated_image_is_refused_before_decoding(tmp_path, monkeypatch, width, height):
    from PIL import ImageFile

    path = _strip(tmp_path, width, height)

    def must_not_decode(self):
        raise AssertionError("the pixels must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(ImageError, match=f"{path.name}: image too elongated \\({width}x{height}"):
        load_input(path, Preprocessing(input_size=224, resize=256))


def test_item4_aspect_limit_allows_panoramas(tmp_path):
    path = save(Image.new("RGB", (images.MAX_ASPECT_RATIO * 4, 4), (9, 9, 9)), tmp_path / "pano.png")
    assert load_input(path, Preprocessing(input_size=8, resize=8)).shape == (3, 8, 8)


def test_item4_in_memory_image_is_checked_by_to_input():
    with pytest.raises(ImageError, match="too elongated"):
        to_input(Image.new("L", (60_000, 2)), Preprocessing(input_size=224, resize=256))


def test_item4_memory_error_while_decoding_is_that_images_error(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = save(Image.new("RGB", (20, 20)), tmp_path / "a.png")

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(ImageError, match="a.png: not enough memory to decode"):
        load_rgb(path)


def test_item4_memory_error_while_resizing_is_that_images_error(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (20, 20)), tmp_path / "a.png")

    def out_of_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "resize", out_of_memory)
    with pytest.raises(ImageError, match="a.png: not enough memory to resize this 20x20 image"):
        load_input(path, Preprocessing(input_size=8, resize=10))
