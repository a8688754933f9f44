"""Reading captioning datasets in the common public formats into a CaptionDataset.

A dataset is named (`synthetic`, `flickr8k`, `flickr30k`) or given as a folder or an annotation
file; the format is detected from the files. Splits are the dataset's own where it has them,
else a seeded split by image.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from capcli.data.download import KAGGLE_DATASETS, downloaded_path
from capcli.data.records import SPLITS, CaptionDataset
from capcli.errors import CapcliError

NAMED = ("synthetic", *KAGGLE_DATASETS)
FORMAT_HELP = (
    "expected a Kaggle Flickr8k folder (Images/ + captions.txt), Flickr8k.token.txt, a Karpathy "
    "dataset_*.json, a COCO captions_*.json or a Flickr30k results.csv"
)
# Names of the annotation files looked for in a dataset folder, in order of preference.
_FOLDER_PATTERNS = (
    ("kaggle", "captions.txt"),
    ("flickr8k_token", "*.token.txt"),
    ("karpathy", "dataset_*.json"),
    ("coco", "captions_*.json"),
    ("flickr30k_csv", "results.csv"),
)
_SEARCH_DEPTH = 2  # Kaggle's Flickr30k nests its files one folder down
_SPLIT_LISTS = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# The real Flickr8k.token.txt names one image "2258277193_586949ec62.jpg.1".
_NUMBERED_JPG = re.compile(r"(\.jpe?g)\.\d+$", re.IGNORECASE)
_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#\d+\s+(?P<caption>.*)$")


@dataclass
class _Parsed:
    """What a reader found: captions per image in file order, the file's own splits if any."""

    captions: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, list[str]] | None = None
    notes: list[str] = field(default_factory=list)
    skipped_lines: list[int] = field(default_factory=list)

    def add(self, image: str, caption: str) -> None:
        caption = " ".join(caption.split())
        if caption:
            self.captions.setdefault(image, []).append(caption)


# ---------------------------------------------------------------- public entry point


def load_dataset(
    spec: str,
    images: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> CaptionDataset:
    """Read a named dataset, a dataset folder or an annotation file."""
    _check_fractions(val_fraction, test_fraction)
    name, annotation, fmt = _resolve(str(spec))
    parsed = _READERS[fmt](annotation)
    if fmt in ("kaggle", "flickr8k_token"):
        _apply_split_lists(parsed, annotation.parent)
    _drop_unsafe_names(parsed)
    if not parsed.captions:
        raise CapcliError(f"{annotation}: no captions found")
    if parsed.skipped_lines:
        lines = parsed.skipped_lines
        parsed.notes.append(
            f"skipped {len(lines)} malformed line(s) of {annotation.name} (first: line {lines[0]})"
        )
    images_dir = _images_dir_override(images) if images is not None else _find_images_dir(annotation, parsed)
    captions = {image: parsed.captions[image] for image in sorted(parsed.captions)}
    splits = parsed.splits or _seeded_splits(list(captions), seed, val_fraction, test_fraction)
    return CaptionDataset(name, fmt, annotation, images_dir, captions, splits, parsed.notes)


def stored_dataset(spec: str) -> str:
    """A dataset as a run records it, to be found again from any folder: a name (synthetic, flickr8k, ...) as it
    is, an existing path made absolute; anything else as typed (load_dataset refuses it in its own words)."""
    return spec if not spec or spec in NAMED else _absolute_if_there(spec)


def stored_images(images: str | Path | None) -> str | None:
    """--images as a run records it: absolute when it exists (see stored_dataset)."""
    return None if images is None else _absolute_if_there(str(images))


def _absolute_if_there(text: str) -> str:
    path = Path(text).expanduser()
    return str(path.absolute()) if text and path.exists() else text


def dataset_files(ds: CaptionDataset) -> list[Path]:
    """The files besides its images that a dataset is read from: the annotation file, Flickr8k's split lists and
    the synthetic set's ground truth (objects.json), those that exist."""
    folder = ds.annotation.parent
    extra = (folder / name for name in (*_SPLIT_LISTS.values(), "objects.json"))
    return [ds.annotation, *(path for path in extra if path.is_file())]


def image_of(ds: CaptionDataset, path: str | Path) -> str | None:
    """The dataset's name for the image at `path` (by where its folder really is), or None."""
    try:
        folder = Path(os.path.realpath(Path(path).parent)).relative_to(os.path.realpath(ds.images_dir))
    except ValueError:
        return None
    name = (folder / Path(path).name).as_posix()
    return name if name in ds.captions else None


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for label, value in (("validation", val_fraction), ("test", test_fraction)):
        if not 0 <= value < 1:
            raise CapcliError(f"the {label} fraction must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise CapcliError("the validation and test fractions together must leave some training images")


# ---------------------------------------------------------------- finding the annotation file


def _resolve(spec: str) -> tuple[str, Path, str]:
    """(dataset name, annotation file, format) for a name, folder or file."""
    if spec == "synthetic":
        return "synthetic", _synthetic_folder() / "captions.txt", "kaggle"
    if spec in KAGGLE_DATASETS:
        folder = downloaded_path(spec)
        if folder is None:
            raise CapcliError(
                f"{spec} is not downloaded yet: run `capcli data download {spec}` "
                "(or pass its folder or annotation file)"
            )
        annotation, fmt = _find_annotation(folder)
        return spec, annotation, fmt
    path = Path(spec).expanduser()
    if path.is_dir():
        annotation, fmt = _find_annotation(path)
        return path.resolve().name or str(path), annotation, fmt
    if path.is_file():
        return path.stem, path, _detect_format(path)
    names = ", ".join(NAMED)
    raise CapcliError(f"{spec}: no such file or folder (a dataset is one of {names}, a folder or a file)")


def _synthetic_folder() -> Path:
    from capcli.data import synthetic

    n_images = synthetic.DEFAULT_IMAGES
    path = synthetic.default_synthetic_path(n_images)
    if synthetic.is_synthetic_set(path):
        return path
    from capcli.console import progress

    with progress(transient=True) as bar:
        task = bar.add_task("generating the synthetic dataset", total=n_images, info="")
        return synthetic.default_synthetic(n_images, progress=lambda done: bar.update(task, completed=done))


def _find_annotation(folder: Path) -> tuple[Path, str]:
    """The annotation file in `folder` or up to two levels below it, and its format."""
    for level in _folders_by_depth(folder, _SEARCH_DEPTH):
        found = [(fmt, p) for fmt, pattern in _FOLDER_PATTERNS for d in level for p in _matches(d, pattern)]
        if not found:
            continue
        fmt = found[0][0]
        files = sorted(p for f, p in found if f == fmt)
        if len(files) > 1:
            listed = ", ".join(str(p.relative_to(folder)) for p in files)
            raise CapcliError(f"{folder}: several annotation files ({listed}): pass one of them")
        return files[0], _detect_format(files[0])
    raise CapcliError(f"{folder}: no annotation file found ({FORMAT_HELP})")


def _folders_by_depth(folder: Path, depth: int) -> Iterable[list[Path]]:
    level = [folder]
    for _ in range(depth + 1):
        yield level
        level = sorted(child for d in level for child in _subfolders(d))


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return []


def _matches(folder: Path, pattern: str) -> list[Path]:
    # "lemma" token files hold lemmatised captions, not the raw ones.
    return [p for p in folder.glob(pattern) if p.is_file() and "lemma" not in p.name.lower()]


def _detect_format(path: Path) -> str:
    """The format of an annotation file, from its content."""
    if path.suffix.lower() == ".json":
        return _detect_json_format(path)
    first = _first_line(path)
    if [h.strip().lower() for h in first.split(",")] == ["image", "caption"]:
        return "kaggle"
    if first.replace(" ", "").lower().startswith("image_name|comment_number|comment"):
        return "flickr30k_csv"
    if _TOKEN_LINE.match(first):
        return "flickr8k_token"
    raise CapcliError(f"{path}: unknown annotation format ({FORMAT_HELP})")


def _is_utf16(path: Path) -> bool:
    """A UTF-16 BOM, or the zero byte beside the first character that ASCII text in UTF-16 has."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or head.count(b"\0") == 1


def _not_utf8(path: Path) -> CapcliError:
    return CapcliError(f"{path}: not UTF-8 text" + (" (it is UTF-16: save it as UTF-8)" if _is_utf16(path) else ""))


def _first_line(path: Path) -> str:
    if _is_utf16(path):  # read with errors="replace" below, it would look like no known format
        raise _not_utf8(path)
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except OSError as exc:
        raise CapcliError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    raise CapcliError(f"{path}: empty file")


def _detect_json_format(path: Path) -> str:
    name = path.name.lower()
    if name.startswith("dataset_"):
        return "karpathy"
    if name.startswith("captions_"):
        return "coco"
    data = _load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return "karpathy"
    raise CapcliError(f"{path}: unknown annotation format ({FORMAT_HELP})")


# ---------------------------------------------------------------- readers


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise CapcliError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def _read_lines(path: Path, read: Callable[[Any, _Parsed], None]) -> _Parsed:
    """Run a line-based reader, turning decoding and CSV errors into one-line CapcliErrors."""
    parsed = _Parsed()
    try:
        with _open_text(path) as f:
            read(f, parsed)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as exc:
        raise CapcliError(f"{path}: malformed CSV ({exc})") from None
    return parsed


def _read_kaggle(path: Path) -> _Parsed:
    def read(f, parsed: _Parsed) -> None:
        lines = _Lines(f)
        first = next(lines, None)
        if first is None:
            raise CapcliError(f"{path}: empty file")
        header, _ = _csv_line(first[1])
        if [h.strip().lower() for h in header] != ["image", "caption"]:
            raise CapcliError(f"{path}: expected the CSV header 'image,caption', found {','.join(header)!r}")
        stray_quotes = []
        for lineno, line in lines:
            row, unbalanced = _csv_line(line)
            if unbalanced and line.startswith('"'):  # a quoted image name may hold a newline: "a\nb.jpg",caption
                row, unbalanced = _quoted_name_row(line, lines, row)
            if not any(cell.strip() for cell in row):
                continue
            if unbalanced:
                stray_quotes.append(lineno)
            if len(row) < 2 or not row[0].strip():
                parsed.skipped_lines.append(lineno)
                continue
            # An unquoted comma splits a caption into more cells: join them back.
            parsed.add(row[0].strip(), ",".join(row[1:]))
        if stray_quotes:
            parsed.notes.append(_stray_quote_note(path, stray_quotes))

    return _read_lines(path, read)


def _csv_line(line: str) -> tuple[list[str], bool]:
    """One physical line as CSV cells, and whether a quote opened on it is left unclosed.

    Captions never span lines, so each line is parsed on its own: a stray '"' that opens a quoted
    cell would otherwise swallow the following rows into one caption.
    """
    row = next(csv.reader([line.rstrip("\r\n") + "\n"]), [])
    unbalanced = any("\n" in cell for cell in row)  # the line ended inside the quoted cell
    return [cell.rstrip("\r\n") for cell in row], unbalanced


_NAME_LINES = 4  # a quoted image name is read over at most this many lines


def _quoted_name_row(line: str, lines, row: list[str]) -> tuple[list[str], bool]:
    """The record of a quoted image name that holds newlines, read on from the next lines while its quote stays
    open; `row`, unbalanced, unless the name's quote closes within _NAME_LINES lines, followed by a caption on
    that same line. Only names are read over lines: a caption's stray quote never swallows the rows after it."""
    text, taken = line, []
    for _ in range(_NAME_LINES - 1):
        following = next(lines, None)
        if following is None:
            break
        taken.append(following)
        text += following[1]
        records = list(csv.reader(io.StringIO(text)))
        if len(records) == 1 and len(records[0]) >= 2 and "\n" in records[0][0] and "\n" not in ",".join(
                records[0][1:]).rstrip("\r\n"):
            return [cell.rstrip("\r\n") for cell in records[0]], False
        if text.count('"') % 2 == 0:
            break  # the quote closed without a caption after it: not a name over lines
    lines.push_back(taken)
    return row, True


class _Lines:
    """(line number, line) pairs of a file, with lines read ahead given back."""

    def __init__(self, f) -> None:
        self._lines, self._back = enumerate(f, 1), []

    def __iter__(self):
        return self

    def __next__(self):
        return self._back.pop() if self._back else next(self._lines)

    def push_back(self, taken: list) -> None:
        self._back.extend(reversed(taken))


def _stray_quote_note(path: Path, lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
    return (
        f'{path.name}: unbalanced quote (") on line(s) {shown}; each such line was read as one caption on '
        "its own, not merged with the lines after it: fix the quote to silence this"
    )


def _repair_image_name(name: str) -> str:
    return _NUMBERED_JPG.sub(r"\1", name.strip())


def _read_flickr8k_token(path: Path) -> _Parsed:
    def read(f, parsed: _Parsed) -> None:
        repaired: set[str] = set()
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            match = _TOKEN_LINE.match(line.strip())
            if not match:
                parsed.skipped_lines.append(lineno)
                continue
            image = _repair_image_name(match["image"])
            if image != match["image"].strip():
                repaired.add(match["image"].strip())
            parsed.add(image, match["caption"])
        if repaired:
            example = sorted(repaired)[0]
            parsed.notes.append(
                f"read {len(repaired)} image name(s) like {example!r} as {_repair_image_name(example)!r}"
            )

    return _read_lines(path, read)


def _read_flickr30k_csv(path: Path) -> _Parsed:
    def read(f, parsed: _Parsed) -> None:
        lines = iter(enumerate(f, 1))
        next(lines, None)  # the header, checked by _detect_format
        for lineno, line in lines:
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("|", 2)
            if len(parts) == 2:
                # A known malformed kind: "2199200615.jpg| 4 A dog runs across the grass ."
                number, _, caption = parts[1].strip().partition(" ")
                parts = [parts[0], number, caption] if number.isdigit() else parts
            if len(parts) != 3 or not parts[0].strip() or not parts[2].strip():
                parsed.skipped_lines.append(lineno)
                continue
            parsed.add(parts[0].strip(), parts[2])

    return _read_lines(path, read)


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except OSError as exc:
        raise CapcliError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except json.JSONDecodeError as exc:
        raise CapcliError(f"{path}: malformed JSON (line {exc.lineno}: {exc.msg})") from None


def _require_list(data: Any, key: str, path: Path) -> list:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise CapcliError(f"{path}: expected a JSON object with a list {key!r}")
    return value


_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _read_karpathy(path: Path) -> _Parsed:
    parsed = _Parsed()
    split_of: dict[str, str] = {}
    entries = _require_list(_load_json(path), "images", path)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise CapcliError(f"{path}: images[{i}] has no 'filename'")
        # COCO entries keep images in subfolders ("val2014/COCO_val2014_....jpg").
        image = str(PurePosixPath(entry.get("filepath") or "", entry["filename"]))
        for sentence in entry.get("sentences") or []:
            parsed.add(image, _karpathy_sentence(sentence))
        if "split" in entry:
            if entry["split"] not in _KARPATHY_SPLITS:
                raise CapcliError(f"{path}: images[{i}] has an unknown split {entry['split']!r}")
            split_of[image] = _KARPATHY_SPLITS[entry["split"]]
    if all(image in split_of for image in parsed.captions):
        parsed.splits = _splits_from_mapping(split_of, parsed.captions)
    elif split_of:
        parsed.notes.append("some images have no split: using a seeded split instead")
    return parsed


def _karpathy_sentence(sentence: Any) -> str:
    if not isinstance(sentence, dict):
        return ""
    if isinstance(sentence.get("raw"), str):
        return sentence["raw"]
    tokens = sentence.get("tokens")
    return " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else ""


def _read_coco(path: Path) -> _Parsed:
    data = _load_json(path)
    files: dict[Any, str] = {}
    for i, entry in enumerate(_require_list(data, "images", path)):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise CapcliError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        files[entry["id"]] = entry["file_name"]
    parsed = _Parsed()
    unknown = 0
    for i, ann in enumerate(_require_list(data, "annotations", path)):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            raise CapcliError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'")
        if ann.get("image_id") not in files:
            unknown += 1
            continue
        parsed.add(files[ann["image_id"]], ann["caption"])
    if unknown:
        parsed.notes.append(f"skipped {unknown} caption(s) whose image_id is not in 'images'")
    return parsed


_READERS: dict[str, Callable[[Path], _Parsed]] = {
    "kaggle": _read_kaggle,
    "flickr8k_token": _read_flickr8k_token,
    "karpathy": _read_karpathy,
    "coco": _read_coco,
    "flickr30k_csv": _read_flickr30k_csv,
}


# ---------------------------------------------------------------- splits


def _splits_from_mapping(split_of: dict[str, str], captions: dict[str, list[str]]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for image in captions:
        splits[split_of[image]].append(image)
    return {s: sorted(names) for s, names in splits.items()}


def _apply_split_lists(parsed: _Parsed, folder: Path) -> None:
    """Use Flickr_8k.{train,dev,test}Images.txt beside the captions when all three are there."""
    present = {split: folder / name for split, name in _SPLIT_LISTS.items() if (folder / name).is_file()}
    if not present:
        return
    if len(present) < len(_SPLIT_LISTS):
        missing = ", ".join(name for split, name in _SPLIT_LISTS.items() if split not in present)
        raise CapcliError(
            f"{folder}: split list(s) {missing} missing: keep all three Flickr_8k.*Images.txt or none"
        )
    split_of: dict[str, str] = {}
    for split, path in present.items():
        for image in _read_split_list(path):
            split_of.setdefault(image, split)  # an image listed twice stays in its first split
    unlisted = [image for image in parsed.captions if image not in split_of]
    for image in unlisted:
        del parsed.captions[image]
    if unlisted:
        parsed.notes.append(f"left out {len(unlisted)} image(s) with captions but in no split list")
    parsed.splits = _splits_from_mapping(split_of, parsed.captions)


def _read_split_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CapcliError(f"{path}: cannot read ({type(exc).__name__})") from None
    return [_repair_image_name(line) for line in text.splitlines() if line.strip()]


def _seeded_splits(
    images: list[str], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """A random split by image, the same for the same seed and images; val/test get >= 1 image each."""
    n = len(images)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= n:
        raise CapcliError(f"{n} image(s) are too few to split into train, validation and test sets")
    order = np.random.default_rng(seed).permutation(n)
    ordered = [images[i] for i in order]
    return {
        "train": sorted(ordered[n_val + n_test :]),
        "val": sorted(ordered[n_test : n_test + n_val]),
        "test": sorted(ordered[:n_test]),
    }


# ---------------------------------------------------------------- images


def _drop_unsafe_names(parsed: _Parsed) -> None:
    """Image names must stay inside the images folder: no absolute paths, no '..'."""
    unsafe = [name for name in parsed.captions if _is_unsafe(name)]
    for name in unsafe:
        del parsed.captions[name]
    if parsed.splits is not None:
        parsed.splits = {s: [n for n in names if not _is_unsafe(n)] for s, names in parsed.splits.items()}
    if unsafe:
        parsed.notes.append(f"left out {len(unsafe)} image name(s) pointing outside the images folder")


def _is_unsafe(name: str) -> bool:
    posix = PurePosixPath(name.replace("\\", "/"))
    return posix.is_absolute() or ".." in posix.parts or (len(name) > 1 and name[1] == ":")


def _images_dir_override(images: str | Path) -> Path:
    path = Path(images).expanduser()
    if not path.is_dir():
        raise CapcliError(f"{images}: no such images folder")
    return path


def _find_images_dir(annotation: Path, parsed: _Parsed) -> Path:
    """The folder near the annotation file that holds the most of a sample of its images."""
    names = sorted(parsed.captions)
    sample = names[:: max(1, len(names) // 8)][:8]
    here, up = annotation.parent, annotation.parent.parent
    candidates = list(dict.fromkeys([here, *_subfolders(here), up, *_subfolders(up)]))
    scores = [sum((d / name).is_file() for name in sample) for d in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    if scores[best] > 0:
        return candidates[best]
    # None found (images not there yet): the conventional place, so `info` can report them missing.
    for conventional in ("Images", "images"):
        if (here / conventional).is_dir():
            return here / conventional
    return here
