"""Uploads: the multipart body read as it streams in, and each image decoded within the server's budgets.

The body is parsed chunk by chunk (python-multipart's low-level parser), so an image is refused the moment it
passes the per-image limit, a file sent in the wrong field before its first byte is kept, and nothing is
spooled to disk: each image is at most max_image_bytes, and the bytes of all requests being read are capped
server-wide (capcli.serve.limits.UploadBudget). Decoding goes through the CLI's own loader (capcli.images)
from memory, with the decoded image's memory reserved from its header first (limits.DecodeBudget).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import AsyncIterator

import numpy as np

from capcli.backbone import Preprocessing
from capcli.images import ImageError, decode_pixels, normalise
from capcli.serve.limits import DecodeBudget, trim_after

try:  # python-multipart >= 0.0.13 names its module python_multipart; older releases, multipart
    from python_multipart import MultipartParser
    from python_multipart.multipart import MultipartState, parse_options_header
except ImportError:  # pragma: no cover
    from multipart import MultipartParser
    from multipart.multipart import MultipartState, parse_options_header

# The parser logs each malformed body itself, as a bare line through logging's last resort (no level, no client);
# the server logs its own line instead (capcli.serve.app), so the parser's go nowhere.
for _name in ("python_multipart", "multipart"):
    logging.getLogger(_name).addHandler(logging.NullHandler())
    logging.getLogger(_name).propagate = False

IMAGES_FIELD = "images"
MAX_FIELDS = 64
MAX_FIELD_BYTES = 1000  # an option's value: a number or a word
MAX_PART_HEADER_BYTES = 8192


class UploadError(Exception):
    """A request the client must fix; `status` is the HTTP status to answer with, `log` what the server's log says
    of it (None: nothing, as for most refusals, which only the client needs to know)."""

    def __init__(self, message: str, status: int = 400, log: str | None = None):
        super().__init__(message)
        self.status = status
        self.log = log


def display_name(filename: str | None, index: int) -> str:
    """The client's file name, printable and short, or its position in the request."""
    name = "".join(ch for ch in (filename or "") if ch.isprintable())[:200]
    return name or f"image {index + 1}"


def check_size(name: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise UploadError(f"{name}: empty file")
    if size > max_bytes:
        raise UploadError(f"{name}: {size / 1e6:.1f} MB is over the limit of {max_bytes / 1e6:g} MB per image", 413)


def image_input(data: bytes, name: str, prep: Preprocessing, budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode one upload into a float32 [3, S, S] array; UploadError (400) names what is wrong with it.

    With a budget, the decoded image's bytes are reserved from its header before decoding (limits.Refused:
    413 when it could never fit, 503 when the server stays too busy); after a large decode the freed memory
    is handed back to the system."""
    costs: list[int] = []

    @contextlib.contextmanager
    def reserve(cost: int):
        costs.append(cost)
        with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
            yield

    try:
        pixels = decode_pixels(io.BytesIO(data), name, prep, reserve)
    except ImageError as exc:
        raise UploadError(str(exc)) from None
    finally:
        if costs:
            trim_after(costs[0])
    return normalise(pixels, prep)


class _Part:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.field = ""
        self.name: str | None = None  # the display name of a file part; None for an option
        self.data = bytearray()


class FormReader:
    """A multipart/form-data body fed chunk by chunk: images (bytes, each within max_image_bytes) and options.

    Every limit is checked as the bytes arrive, so a refused request is not read further.
    """

    def __init__(self, boundary: bytes, max_files: int, max_image_bytes: int):
        self.max_files, self.max_image_bytes = max_files, max_image_bytes
        self.uploads: list[tuple[str, bytes]] = []
        self.fields: dict[str, str] = {}
        self._files = self._options = 0
        self._part = _Part()
        self._header_name = self._header_value = b""
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._header_field, "on_header_value": self._header_field_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        })

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except UploadError:
            raise
        except Exception as exc:  # python-multipart's parse errors: the body is not the multipart it says it is
            raise UploadError("invalid multipart/form-data body", log=f"invalid multipart/form-data body ({exc})") \
                from None

    def finish(self) -> None:
        message = "invalid multipart/form-data body (it ends before its closing boundary)"
        try:
            self._parser.finalize()
        except Exception as exc:
            raise UploadError(message, log=f"{message}: {exc}") from None
        if self._parser.state not in (MultipartState.START, MultipartState.END):  # cut inside a part: no error
            raise UploadError(message, log=message)

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow_header(end - start)
        self._header_name += data[start:end]

    def _header_field_value(self, data: bytes, start: int, end: int) -> None:
        self._grow_header(end - start)
        self._header_value += data[start:end]

    def _grow_header(self, count: int) -> None:
        self._part.header_bytes += count
        if self._part.header_bytes > MAX_PART_HEADER_BYTES:
            raise UploadError(f"a part's headers are over {MAX_PART_HEADER_BYTES} bytes", 400)

    def _header_end(self) -> None:
        self._part.headers.append((self._header_name.lower(), self._header_value))
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        part = self._part
        disposition = next((v for k, v in part.headers if k == b"content-disposition"), b"")
        _, params = parse_options_header(disposition)
        if b"name" not in params:
            raise UploadError("a form part has no name (Content-Disposition: form-data; name=...)", 400)
        part.field = params[b"name"].decode("utf-8", "replace")
        if b"filename" in params:
            self._files += 1
            if self._files > self.max_files:
                raise UploadError(f"Too many files: at most {self.max_files} images per request", 400)
            part.name = display_name(params[b"filename"].decode("utf-8", "replace"), self._files - 1)
            if part.field != IMAGES_FIELD:  # refused before a byte of the file is kept
                raise UploadError(f"{part.name}: files go in the '{IMAGES_FIELD}' field, not "
                                  f"'{display_name(part.field, 0)}'", 422)
        else:
            self._options += 1
            if self._options > MAX_FIELDS:
                raise UploadError(f"Too many fields: at most {MAX_FIELDS} options per request", 400)

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        limit = self.max_image_bytes if part.name is not None else MAX_FIELD_BYTES
        if len(part.data) + end - start > limit:
            if part.name is not None:
                raise UploadError(f"{part.name}: over the limit of {limit / 1e6:g} MB per image "
                                  "(refused while it was being sent)", 413)
            raise UploadError(f"option '{display_name(part.field, 0)}': over {limit} bytes", 413)
        part.data += data[start:end]

    def _end(self) -> None:
        part = self._part
        self._part = _Part()  # the finished part's bytes are not kept twice
        if part.name is not None:
            check_size(part.name, len(part.data), self.max_image_bytes)
            self.uploads.append((part.name, bytes(part.data)))
        elif part.field in self.fields:
            raise UploadError(f"option '{display_name(part.field, 0)}' given more than once", 422)
        else:
            self.fields[part.field] = part.data.decode("utf-8", "replace")


def multipart_boundary(content_type: str | None) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type; None for any other body."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        return None
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError("multipart/form-data without a boundary", 400)
    return boundary


async def read_form(content_type: str | None, chunks: AsyncIterator[bytes], max_files: int,
                    max_image_bytes: int) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """(images as (display name, bytes), options) of a request body, refused as soon as a limit is passed."""
    boundary = multipart_boundary(content_type)
    if boundary is None:
        raise UploadError(f"no images: send them as multipart/form-data files in the field '{IMAGES_FIELD}'")
    reader = FormReader(boundary, max_files, max_image_bytes)
    async for chunk in chunks:
        reader.feed(chunk)
    reader.finish()
    if not reader.uploads:
        raise UploadError(f"no images: send them as multipart/form-data files in the field '{IMAGES_FIELD}'")
    return reader.uploads, reader.fields
