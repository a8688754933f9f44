"""Server-wide budgets that hostile clients cannot exhaust: decoded-image memory, bytes of uploads in flight,
and giving freed memory back to the system after large requests.

A PNG of a few hundred kB can decode to hundreds of MB; the decode budget is reserved from the image's header
(capcli.images.decode_cost) before any pixel is decoded, so concurrent decodes never hold more than the
server's limit together. Uploads are counted as their bytes arrive, across every request being read.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
import threading
import time
from collections.abc import Iterator

MB = 1_000_000


class Refused(Exception):
    """A request the server will not take now or ever; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class DecodeBudget:
    """Bytes of decoded-image memory shared by concurrent decodes (a counting semaphore over bytes).

    An image that needs more than the whole budget is refused at once (413: it would never fit); one that
    does not fit beside the decodes running now waits for them, up to `wait_s`, then is turned away (503).
    """

    def __init__(self, limit_bytes: int, wait_s: float):
        self.limit, self.wait_s = limit_bytes, wait_s
        self.used = 0
        self.peak = 0  # the most ever reserved at once, for tests and /v1/model
        self._free = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        if cost > self.limit:
            raise Refused(f"decoding this image needs {cost / MB:,.0f} MB, more than this server's limit of "
                          f"{self.limit / MB:,.0f} MB (--max-decode-mb); send a smaller image", 413)
        deadline = time.monotonic() + self.wait_s
        with self._free:
            while self.used + cost > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused("server busy decoding other large images; retry shortly", 503)
                self._free.wait(left)
            self.used += cost
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._free:
                self.used -= cost
                self._free.notify_all()


class UploadBudget:
    """Bytes of request bodies being read, over all requests: past the limit a request is turned away (503)."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> None:
        with self._lock:
            if self.used + count > self.limit:
                raise Refused(f"server busy: {self.used / MB:,.0f} MB of uploads are being received; "
                              "retry shortly", 503)
            self.used += count

    def give_back(self, count: int) -> None:
        with self._lock:
            self.used -= count


class BodyAccount:
    """One request's share of the upload budget; given back once, when its images are decoded (or it ends)."""

    def __init__(self, budget: UploadBudget):
        self.budget, self.held, self.closed = budget, 0, False

    def take(self, count: int) -> None:
        if self.closed:  # read after its images were decoded (a trailing epilogue): nothing left to hold
            return
        self.budget.take(count)
        self.held += count

    def release(self) -> None:
        if not self.closed:
            self.closed = True
            self.budget.give_back(self.held)
            self.held = 0


# --- giving memory back --------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Allocations from this size up get their own mapping, returned to the system when freed. glibc otherwise
# raises this threshold to the size of each large block it frees (up to 32 MB), after which Pillow's 16 MB
# image blocks come from the heap, fragment it, and keep the server's RSS at its worst burst's level.
MMAP_THRESHOLD = 4 << 20
TRIM_AFTER_BYTES = 64 << 20  # a decode at least this large is followed by malloc_trim
_libc = None
_trim_lock = threading.Lock()


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
                    _libc = lib
            except OSError:
                pass
    return _libc or None


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold (see MMAP_THRESHOLD); False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)  # the heap's free top goes back beyond this much
    return ok


def trim_after(cost: int) -> None:
    """After a large decode, hand the freed pages back to the system (glibc malloc_trim); one at a time."""
    libc = _glibc()
    if libc is None or cost < TRIM_AFTER_BYTES:
        return
    if _trim_lock.acquire(blocking=False):  # a trim already running frees this request's pages too
        try:
            libc.malloc_trim(0)
        finally:
            _trim_lock.release()
