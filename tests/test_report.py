"""The HTML report: escaping, embedded thumbnails, placeholders and the scores table."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from capcli.report import THUMBNAIL_PX, write_html


def make_image(path: Path, size: tuple[int, int] = (640, 320)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_report_is_written_with_thumbnails_and_escaped_text(tmp_path: Path) -> None:
    image = make_image(tmp_path / "red.png")
    rows = [
        {
            "image": str(image),
            "caption": "a <script>alert(1)</script> & a red square",
            "score": -0.41,
            "references": ['a "red" <b>box</b>'],
            "alternatives": [["a red <i>square</i>", -0.41], ["a red box", -0.52]],
        }
    ]
    out = write_html(tmp_path / "sub" / "report.html", rows, title="run <1>", note="beam 3 & greedy")
    assert out == tmp_path / "sub" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>box</b>" not in text and "<i>square</i>" not in text
    assert "a &lt;script&gt;alert(1)&lt;/script&gt; &amp; a red square" in text
    assert "a &quot;red&quot; &lt;b&gt;box&lt;/b&gt;" in text
    assert "run &lt;1&gt;" in text and "beam 3 &amp; greedy" in text
    assert "-0.410" in text and "-0.520" in text

    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(uris) == 1
    thumb = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert thumb.format == "JPEG" and max(thumb.size) == THUMBNAIL_PX
    assert thumb.size == (160, 80)  # aspect ratio kept
    assert not list(tmp_path.joinpath("sub").glob("*.tmp"))  # no temp file left behind


def test_missing_or_broken_images_show_a_placeholder(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    rows = [
        {"image": str(tmp_path / "nowhere.jpg"), "caption": "a dog", "score": None},
        {"image": str(broken), "caption": "", "score": None, "error": "cannot identify image <file>"},
    ]
    text = write_html(tmp_path / "report.html", rows).read_text(encoding="utf-8")
    assert text.count("image unavailable") == 2
    assert "data:image/jpeg" not in text
    assert "cannot identify image &lt;file&gt;" in text
    assert "nowhere.jpg" in text


def test_scores_table_at_the_top(tmp_path: Path) -> None:
    scores = {"BLEU-4": 23.456, "CIDEr-D": 61.0}
    rows = [{"image": str(make_image(tmp_path / "a.jpg", (50, 60))), "caption": "a dog", "score": -1.0}]
    text = write_html(tmp_path / "r.html", rows, scores=scores).read_text(encoding="utf-8")
    assert '<table class="scores">' in text
    assert "<th>BLEU-4</th>" in text and "<td>23.46</td>" in text and "<td>61.00</td>" in text
    assert text.index('class="scores"') < text.index("a dog")
    no_scores = write_html(tmp_path / "r2.html", rows).read_text(encoding="utf-8")
    assert 'class="scores"' not in no_scores


# --- attention heatmaps ------------------------------------------------------------------------------------


def _one_hot(row: int, col: int, grid=(7, 7)):
    import numpy as np

    alpha = np.zeros(grid[0] * grid[1], np.float32)
    alpha[row * grid[1] + col] = 1.0
    return alpha


def test_heatmap_peaks_over_the_attended_cell() -> None:
    import numpy as np

    from capcli.heatmaps import upsample

    heat = upsample(_one_hot(2, 5), (7, 7), 112)  # cell (row 2, column 5) covers y 32..48, x 80..96
    assert heat.shape == (112, 112) and heat.min() >= 0 and heat.max() <= 1
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 32 <= y < 48 and 80 <= x < 96
    assert heat[40, 88] > 0.5 > heat[100, 10]


def test_overlay_lights_what_was_looked_at() -> None:
    import numpy as np

    from capcli.heatmaps import DIM, overlay

    view = np.full((4, 4, 3), 200, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    lit = overlay(view, heat)
    assert lit[0, 0, 0] >= 200 and lit[3, 3, 0] == int(200 * DIM)


def test_model_view_is_the_centre_crop_the_backbone_sees(tmp_path: Path) -> None:
    import numpy as np

    from capcli.backbone import Preprocessing
    from capcli.heatmaps import model_view

    image = Image.new("RGB", (400, 200), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 200))  # left quarter red: cut off by the centre crop
    image.paste((0, 255, 0), (200, 0, 400, 200))  # right half green
    image.save(tmp_path / "wide.png")
    view = model_view(tmp_path / "wide.png", Preprocessing(input_size=64, resize=64, mean=(0.5,) * 3, std=(0.2,) * 3))
    assert view.shape == (64, 64, 3) and view.dtype == np.uint8
    assert tuple(view[32, 5]) == (0, 0, 255) and tuple(view[32, 60]) == (0, 255, 0)


def test_report_draws_one_heatmap_per_word(tmp_path: Path) -> None:
    from capcli.backbone import Preprocessing

    image = make_image(tmp_path / "shape.png", (224, 224))
    prep = Preprocessing(input_size=224, resize=256)
    words = [("a", _one_hot(0, 0)), ("red", _one_hot(3, 3)), ("<sq>", _one_hot(6, 6))]
    rows = [{"image": str(image), "caption": "a red <sq>", "score": -0.2, "attention": words, "grid": (7, 7),
             "preprocessing": prep},
            {"image": str(tmp_path / "gone.png"), "caption": "x", "score": -1.0, "attention": words[:1],
             "grid": (7, 7), "preprocessing": prep}]
    text = write_html(tmp_path / "r.html", rows).read_text(encoding="utf-8")
    figures = re.findall(r'<figure><img src="data:image/jpeg;base64,([^"]+)" alt="([^"]*)"><figcaption>([^<]*)<', text)
    assert [f[2] for f in figures] == ["a", "red", "&lt;sq&gt;"]
    assert text.count('class="view"') == 1 and "7x7 grid" in text
    heat = Image.open(io.BytesIO(base64.b64decode(figures[1][0])))
    assert heat.size == (128, 128)
    assert "attention maps unavailable for this image" in text  # the missing image: the report still writes
