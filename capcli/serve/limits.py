"""Server-wide budgets that hostile clients cannot exhaust: decoded-image memory, bytes of uploads in flight,
open connections and how long one may take to send its request's headers, and giving freed memory back to the
system after large requests.

A PNG of a few hundred kB can decode to hundreds of MB; the decode budget is reserved from the image's header
(capcli.images.decode_cost) before any pixel is decoded, so concurrent decodes never hold more than the
server's limit together. Uploads are counted as their bytes arrive, across every request being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import platform
import threading
import time
from collections.abc import Iterator

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

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


# --- connections: how many, and how long a request's headers may take -----------------------------------------

_BUSY_BODY = b'{"error": "server busy: too many open connections (--max-connections); retry shortly"}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(_BUSY_BODY)).encode() + b"\r\nconnection: close\r\nretry-after: 1\r\n\r\n" + _BUSY_BODY)
REFUSED_LINGER_S = 1.0  # a refused connection reads (and drops) what its client sends this long, then closes
_log = logging.getLogger("uvicorn.error")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two bounds uvicorn lacks (make one with `configured`).

    Header timeout: uvicorn arms no timer until a first response is sent, and its keep-alive timer is cancelled
    by any byte received, so a client that sends a request's headers slowly, or nothing at all, holds its
    connection forever. Here a connection that has not completed a request's headers `header_timeout_s` after
    the server started waiting for them (the connection opened, or its previous response was sent) is closed;
    so is one still sending a body nobody reads that long after its response.

    Connection cap: uvicorn's limit_concurrency accepts every connection and answers 503 to any request made
    while that many are open, its own and the clients' already being served included. Here a connection
    opened while `max_connections` are open is answered 503 at once, without reading a request, and closed;
    the ones already open are served as before.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 512
    _header_timer: asyncio.TimerHandle | None = None
    _refused = False
    _warned_at = float("-inf")  # of the class: one log line per 10 s of refusals, not one per connection
    _refused_since_warning = 0

    @classmethod
    def configured(cls, header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
        """A subclass with these limits, for uvicorn.Config(http=...)."""
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections})

    def connection_made(self, transport) -> None:
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused connection's request is dropped unread: its 503 is sent
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if not self._refused:
            super().connection_lost(exc)

    def _waiting_for_client(self) -> bool:
        """Headers not all in yet, or a body arriving that no handler reads (its response was sent)."""
        theirs, ours = self.conn.their_state, self.conn.our_state
        return theirs is h11.IDLE or (theirs is h11.SEND_BODY and ours is h11.DONE)

    def _watch_headers(self) -> None:
        if self.transport.is_closing() or not self._waiting_for_client():
            self._stop_header_timer()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_client():
            return
        what = ("request body still arriving" if self.conn.their_state is h11.SEND_BODY else
                "request headers not complete" if self.conn.trailing_data[0] else None)
        if what:  # a connection that sent nothing (a browser's spare one, an idle keep-alive) closes quietly
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            _log.info("%s: connection closed: %s after %g s (--header-timeout)", peer, what, self.header_timeout_s)
        self.transport.close()

    def _refuse(self, transport) -> None:
        self._refused, self.transport = True, transport
        transport.write(BUSY_RESPONSE)
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the 503, then its end of the stream
        self.loop.call_later(REFUSED_LINGER_S, transport.close)  # its close, if it does not close first
        cls = type(self)
        now = time.monotonic()
        if now - cls._warned_at < 10:  # a flood of them is a line per 10 s, not one each
            cls._refused_since_warning += 1
            return
        more = f" ({cls._refused_since_warning} more since the last such line)" if cls._refused_since_warning else ""
        _log.warning("new connection refused with 503: %d open, the limit (--max-connections)%s",
                     len(self.connections), more)
        cls._warned_at, cls._refused_since_warning = now, 0


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
