"""A self-contained HTML page of captions with thumbnails, for looking at results rather than reading JSON.

Rows of an attention decoder can carry their per-word attention: the page then shows, under the
caption, the image as the model saw it and one heatmap per word (capcli.heatmaps).
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from capcli.paths import atomic_write_text, starts_with

THUMBNAIL_PX = 160
# Marks the page as capcli's, so that a later report may replace it and nothing else is replaced unasked.
GENERATOR = '<meta name="generator" content="capcli">'

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: 0.5em 0.8em; text-align: left; vertical-align: top; }
.scores td, .scores th { border: 1px solid #ddd; }
.thumb img { max-width: 160px; max-height: 160px; }
.missing { width: 160px; height: 100px; background: #eee; color: #777; display: flex;
           align-items: center; justify-content: center; font-size: 0.85em; }
.caption { font-size: 1.1em; }
.score, .path, .note { color: #666; font-size: 0.85em; }
.error { color: #b00020; }
ol, ul { margin: 0.3em 0; padding-left: 1.4em; }
.attention { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 0.6em; max-width: 980px; }
.attention figure { margin: 0; text-align: center; }
.attention img { width: 112px; height: 112px; display: block; border-radius: 3px; }
.attention figcaption { font-size: 0.9em; padding-top: 2px; }
.attention figure.view figcaption { color: #666; }
"""


def write_html(
    path: str | Path,
    rows: list[dict],
    title: str = "capcli captions",
    scores: dict[str, float] | None = None,
    note: str = "",
) -> Path:
    """Write the captions report to `path` (atomically) and return the path.

    Each row: "image" (path), "caption", "score" (or None), and optionally "references" (list of str),
    "alternatives" (list of [caption, score]), "error" (str), "classes" (what the classifier saw, as
    `capcli.guidance.ImageClasses.to_json`), and for word-by-word attention heatmaps
    "attention" (list of (word, alpha [H*W])) with "grid" ((H, W)) and "preprocessing" (the model's).
    """
    path = Path(path)
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8">{GENERATOR}',
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{_esc(note)}</p>')
    if scores:
        parts.append(_scores_table(scores))
    parts.append("<table><tr><th>image</th><th>caption</th><th>references</th></tr>")
    parts.extend(_row(row) for row in rows)
    parts.append("</table></body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return path


def is_report(path: Path) -> bool:
    """Whether the file at `path` is a report capcli wrote (this version's or an earlier one's)."""
    return starts_with(path, b"<!DOCTYPE html>", GENERATOR.encode()) or starts_with(
        path, b"<!DOCTYPE html>", _STYLE.encode()[:60])


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _scores_table(scores: dict[str, float]) -> str:
    head = "".join(f"<th>{_esc(name)}</th>" for name in scores)
    cells = "".join(f"<td>{value:.2f}</td>" for value in scores.values())
    return f'<table class="scores"><tr>{head}</tr><tr>{cells}</tr></table><br>'


def _row(row: dict) -> str:
    image = str(row.get("image", ""))
    cells = [
        f'<td class="thumb">{_thumbnail_html(image)}<div class="path">{_esc(Path(image).name)}</div></td>',
        f"<td>{_caption_html(row)}</td>",
        f"<td>{_list_html('ul', [_esc(r) for r in row.get('references') or []])}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _caption_html(row: dict) -> str:
    parts = [f'<div class="caption">{_esc(row.get("caption") or "")}</div>']
    if row.get("score") is not None:
        parts.append(f'<div class="score">score {float(row["score"]):.3f}</div>')
    if row.get("error"):
        parts.append(f'<div class="error">{_esc(row["error"])}</div>')
    alternatives = [
        f'{_esc(c)} <span class="score">{float(s):.3f}</span>' for c, s in row.get("alternatives") or []
    ]
    if alternatives:
        parts.append(_list_html("ol", alternatives))
    if row.get("classes"):
        parts.append(_classes_html(row["classes"]))
    if row.get("attention"):
        parts.append(_attention_html(row))
    return "".join(parts)


def _classes_html(seen: dict) -> str:
    """What the backbone's classifier saw (capcli.guidance): its top classes, the words steered to or held back."""
    classes = ", ".join(f"{_esc(c['name'])} {100 * float(c['p']):.0f} %" for c in seen.get("classes", []))
    parts = [f"classifier: {classes}"] if classes else []
    if seen.get("boosted"):
        parts.append("steered to: " + ", ".join(_esc(w) for w in seen["boosted"]))
    if seen.get("required"):
        parts.append(f"required: {_esc(seen['required'])}")
    if seen.get("ruled_out"):
        parts.append("held back: " + ", ".join(_esc(w) for w in seen["ruled_out"]))
    return f'<div class="classes note">{"; ".join(parts)}</div>' if parts else ""


def _attention_html(row: dict) -> str:
    """The model's view of the image, then each word over its attention heatmap (the paper's figure)."""
    from capcli.heatmaps import model_view_jpeg, word_maps

    grid, prep = tuple(row["grid"]), row["preprocessing"]
    try:
        view = model_view_jpeg(row["image"], prep, grid=grid)
        maps = word_maps(row["image"], row["attention"], grid, prep)
    except Exception:  # a report must never fail on one bad file
        return '<div class="error">attention maps unavailable for this image</div>'
    figures = [f'<figure class="view"><img src="data:image/jpeg;base64,{view}" alt="model input">'
               f"<figcaption>{grid[0]}x{grid[1]} grid</figcaption></figure>"]
    figures += [f'<figure><img src="data:image/jpeg;base64,{data}" alt="{_esc(word)}">'
                f"<figcaption>{_esc(word)}</figcaption></figure>" for word, data in maps]
    return '<div class="attention">' + "".join(figures) + "</div>"


def _list_html(tag: str, items: list[str]) -> str:
    return f"<{tag}>" + "".join(f"<li>{item}</li>" for item in items) + f"</{tag}>" if items else ""


def _thumbnail_html(image: str) -> str:
    data = _thumbnail(image)
    if data is None:
        return '<div class="missing">image unavailable</div>'
    return f'<img src="data:image/jpeg;base64,{data}" alt="{_esc(Path(image).name)}">'


def _thumbnail(image: str) -> str | None:
    """A base64 JPEG at most THUMBNAIL_PX on a side, or None when the image cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused, not decoded with a warning
            with Image.open(image) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
    except Exception:  # a report must never fail on one bad file: missing, truncated, not an image, too big
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")
