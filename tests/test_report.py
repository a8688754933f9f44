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
