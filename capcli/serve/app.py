"""The HTTP front end: FastAPI app over the captioning pipeline (a bundle, ONNX Runtime, micro-batching).

POST /v1/captions (multipart images + decoding options), GET /v1/model, GET /healthz, the web page at /
and OpenAPI docs at /docs. A request the client got wrong is answered 4xx with {"error": "..."}; nothing a
client sends stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path, PurePath, PureWindowsPath

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from capcli import __version__
from capcli.bundle.manifest import read_manifest
from capcli.errors import CapcliError
from capcli.guidance import can_guide, no_classifier
from capcli.runtime.captioner import DEFAULT_GUARDS, MAX_BEAM, open_captioner
from capcli.serve.batcher import DecodeOptions, MicroBatcher, ServerBusy
from capcli.serve.limits import MB, BodyAccount, DecodeBudget, GuardedH11Protocol, Refused, UploadBudget, tune_malloc
from capcli.serve.uploads import IMAGES_FIELD, UploadError, image_input, read_form

STATIC = files("capcli.serve") / "static"
MAX_NGRAM = 20  # longer than any caption the block could apply to
TOO_LARGE = "request body too large (see the limits in GET /v1/model)"
# uvicorn's own log (shown at info level by `capcli serve`): a client event is a line there like its others.
log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server: batching, and what a request may carry."""

    max_batch: int = 16  # images per encoder/decoder run
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others still being read
    max_files: int = 16  # images per request
    max_image_bytes: int = 20_000_000
    max_queued: int = 256  # images waiting before requests are turned away (503)
    # Decoded-image memory of all concurrent decodes together (capcli.images.decode_cost, from each header).
    # 2 GB, under a tenth of a 24 GB machine: three 9000x9000 transparent PNGs (648 MB each) at once.
    max_decode_bytes: int = 2000 * MB
    # Bytes of request bodies being received at once, over all clients (at least one whole request).
    max_inflight_bytes: int = 512 * MB
    read_timeout_s: float = 30.0  # a request body that sends nothing for this long is cut (408)
    max_read_s: float = 600.0  # and one still arriving after this long (a trickle that never stalls)
    decode_wait_s: float = 30.0  # how long an image waits for decode memory before 503
    decode_threads: int = max(1, min(4, os.cpu_count() or 1))  # concurrent decodes, and so malloc arenas
    header_timeout_s: float = 10.0  # a connection that has not sent a request's headers this long is closed
    max_connections: int = 512  # open connections, idle ones included; one more is answered 503 and closed

    @property
    def max_body_bytes(self) -> int:
        """A request body larger than every allowed image plus room for the form is refused unread."""
        return self.max_files * self.max_image_bytes + 1_000_000

    def check(self) -> None:
        """Limits that contradict each other are one clear error, not a server that refuses every request."""
        if self.max_inflight_bytes < self.max_body_bytes:
            raise CapcliError(f"--max-inflight-mb ({self.max_inflight_bytes / MB:g}) must hold one whole request: "
                              f"--max-files x --max-image-mb + 1 MB = {self.max_body_bytes / MB:g} MB")
        for name in ("read_timeout_s", "max_read_s", "decode_wait_s", "header_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise CapcliError(f"{name} must be a positive number of seconds")
        if self.max_connections < 1:
            raise CapcliError("max_connections must be at least 1")

    def http_protocol(self) -> type[GuardedH11Protocol]:
        """uvicorn's HTTP protocol (`uvicorn.Config(http=...)`) with this server's header timeout and connection
        cap: h11 always, never httptools, which would bypass both."""
        return GuardedH11Protocol.configured(self.header_timeout_s, self.max_connections)


class CaptionOptions(BaseModel):
    """Decoding options of POST /v1/captions (multipart form fields beside the images)."""

    model_config = ConfigDict(extra="forbid")

    beam_size: int = Field(3, ge=1, le=MAX_BEAM, description="Beam width; 1 = greedy.")
    n_best: int = Field(1, ge=1, le=MAX_BEAM, description="Alternatives returned per image (<= beam_size).")
    sample: bool = Field(False, description="Sample words instead of beam search.")
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False,
                               description="Softmax temperature when sampling.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest words (0 = all).")
    seed: int = Field(0, ge=0, lt=2**63, description="Random seed when sampling.")
    allow_unk: bool = Field(False, description="Let <unk> be generated (never, by default).")
    no_repeat_ngram: int = Field(DEFAULT_GUARDS.no_repeat_ngram, ge=0, le=MAX_NGRAM,
                                 description="No n-gram of this length twice in a caption (0 = off).")
    guidance: bool = Field(True, description="Let the backbone's classifier steer the words (bundles whose encoder "
                                             "returns classes); each result then says what it saw.")
    constrain: bool = Field(False, description="With guidance and beam search: each caption must name the word the "
                                               "classes support most (constrained beam search; slower).")

    @model_validator(mode="after")
    def _n_best_within_beam(self) -> CaptionOptions:
        if self.sample and self.n_best > 1:
            raise ValueError(f"n_best ({self.n_best}) needs beam search; sample=true gives one caption per image")
        if not self.sample and self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) cannot exceed beam_size ({self.beam_size})")
        if self.constrain and not self.guidance:
            raise ValueError("constrain needs guidance (guidance=false was given)")
        if self.constrain and (self.sample or self.beam_size < 2):
            raise ValueError("constrain needs beam search (beam_size 2 or more, sample=false)")
        return self


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
    """The client stopped sending its request body (or sends it too slowly to ever finish)."""


BODY_ACCOUNT = "capcli.body"  # scope key of the request's BodyAccount, released once its images are decoded


class BodyLimit:
    """ASGI middleware over every request body: past `limit` bytes it stops reading (413), streamed or not;
    bytes being received count against the server-wide upload budget (503 past it); a body that sends
    nothing for `idle_s`, or is still arriving after `total_s`, is cut (408)."""

    def __init__(self, app, limit: int, uploads: UploadBudget, idle_s: float, total_s: float):
        self.app, self.limit, self.uploads, self.idle_s, self.total_s = app, limit, uploads, idle_s, total_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:  # refused before a byte of it is read
            return await _error(413, TOO_LARGE)(scope, receive, send)
        seen, done = 0, False
        account = scope[BODY_ACCOUNT] = BodyAccount(self.uploads)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s

        async def limited_receive():
            nonlocal seen, done
            if done:  # the body is in: later receives wait for a disconnect, which is not a stall
                return await receive()
            left = min(self.idle_s, deadline - loop.time())
            try:
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                raise BodyStalled() from None
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                raise BodyTooLarge()
            account.take(len(body))
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            account.release()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _options_message(exc: ValidationError) -> str:
    problems = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"])
        problems.append(f"unknown option '{where}'" if e["type"] == "extra_forbidden" else
                        f"{where}: {e['msg']}" if where else e["msg"].removeprefix("Value error, "))
    return "; ".join(problems) + f" (options: {', '.join(CaptionOptions.model_fields)})"


def _as_json(value):
    """numpy values (scores, attention maps) as plain JSON."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    return value


def hypothesis_json(hypothesis) -> dict:
    """One decoded hypothesis as JSON: (caption, score), or with more (e.g. attention), passed through."""
    if isinstance(hypothesis, dict):
        return _as_json(hypothesis)
    if hasattr(hypothesis, "to_dict"):
        return _as_json(hypothesis.to_dict())
    caption, score, *extra = hypothesis
    return _as_json({"caption": caption, "score": float(score), **({"attention": extra[0]} if extra else {})})


def image_result(name: str, hypotheses: list, classes=None) -> dict:
    alternatives = [hypothesis_json(h) for h in hypotheses]
    best = alternatives[0]
    return {"filename": name, **best, "alternatives": alternatives,
            **({"classes": classes.to_json()} if classes is not None else {})}


async def _read_uploads(request: Request, settings: ServeSettings) -> tuple[list[tuple[str, bytes]], dict]:
    return await read_form(request.headers.get("content-type"), request.stream(), settings.max_files,
                           settings.max_image_bytes)


def _parse_options(fields: dict, vocab_size: int, unconstrainable: str | None = None) -> DecodeOptions:
    try:
        options = CaptionOptions(**fields)
    except ValidationError as exc:
        raise UploadError(_options_message(exc), 422) from None
    if options.top_k > vocab_size:
        raise UploadError(f"top_k: at most the vocabulary's {vocab_size} words, got {options.top_k}", 422)
    if options.constrain and unconstrainable:
        raise UploadError(f"constrain: {unconstrainable}", 422)
    return DecodeOptions(**options.model_dump())


def public_manifest(value):
    """The manifest without the server's absolute paths (where the model was trained and exported): only the
    last part of each, which names it without telling a client how the machine is laid out."""
    if isinstance(value, dict):
        return {k: public_manifest(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_manifest(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or PureWindowsPath(value).drive):
        return PurePath(value).name or PureWindowsPath(value).name
    return value


def create_app(bundle: str | Path, provider: str = "auto", settings: ServeSettings | None = None) -> FastAPI:
    """The app for one bundle; its ONNX sessions are created here, once (CapcliError if the bundle is bad)."""
    settings = settings or ServeSettings()
    settings.check()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    captioner = open_captioner(bundle, runtime="onnx", provider=provider)
    # Why `constrain` cannot apply to this model (None where it can), as capcli caption --constrain says it.
    head = getattr(captioner, "classifier", None)
    unconstrainable = None if can_guide(captioner) else no_classifier("this model", head)
    batcher = MicroBatcher(captioner, settings.max_batch, settings.max_wait_ms / 1e3, settings.max_queued,
                           wait_for_readers=True)
    decode_budget = DecodeBudget(settings.max_decode_bytes, settings.decode_wait_s)
    upload_budget = UploadBudget(settings.max_inflight_bytes)
    decoders: list[ThreadPoolExecutor] = []  # made per lifespan: a pool once shut down cannot run again

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        tune_malloc()
        # A few long-lived decode threads: they cap concurrent decodes, and glibc's per-thread heaps with them.
        decoders.append(ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="capcli-decode"))
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)
        decoders.pop().shutdown(wait=False, cancel_futures=True)

    def decode_all(uploads: list[tuple[str, bytes]]) -> np.ndarray:
        return np.stack([image_input(data, name, captioner.preprocessing, decode_budget) for name, data in uploads])

    app = FastAPI(title="capcli", version=__version__, lifespan=lifespan,
                  description=f"Image captions from the bundle `{bundle.name}` ({manifest['backbone']}).")
    app.state.decode_budget, app.state.upload_budget = decode_budget, upload_budget  # for tests and benchmarks
    app.state.settings = settings  # its http_protocol() is what uvicorn must run it with
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, uploads=upload_budget,
                       idle_s=settings.read_timeout_s, total_s=settings.max_read_s)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/healthz", summary="Liveness: the model is loaded and the batcher runs")
    async def healthz() -> dict:
        return {"status": "ok", "model": bundle.name, "queued_images": batcher.queued_images}

    @app.get("/v1/model", summary="The bundle's manifest, the providers in use and the server's limits")
    async def model() -> dict:
        return {"name": bundle.name, "providers": list(captioner.providers), "limits": asdict(settings),
                "manifest": public_manifest(manifest)}

    @app.post("/v1/captions", summary="Caption one or more images", openapi_extra=_captions_openapi())
    async def captions(request: Request) -> JSONResponse:
        started = time.perf_counter()
        with batcher.reading() as reading:
            uploads, fields = await _read_uploads(request, settings)
            options = _parse_options(fields, manifest["vocab_size"], unconstrainable)
            names = [name for name, _ in uploads]
            images = await asyncio.wrap_future(decoders[-1].submit(decode_all, uploads))
            del uploads  # the encoded bytes are done with: free them and their share of the upload budget
            account = request.scope.get(BODY_ACCOUNT)
            if account is not None:
                account.release()
            read_ms = (time.perf_counter() - started) * 1e3
            answer = reading.submit(images, options)
        done = await asyncio.wrap_future(answer)
        timings = {"read": read_ms, **done.timings_ms, "total": (time.perf_counter() - started) * 1e3}
        classes = done.classes or [None] * len(names)
        results = [image_result(name, hyps, seen)
                   for name, hyps, seen in zip(names, done.hypotheses, classes, strict=True)]
        return JSONResponse({"model": bundle.name, "options": asdict(options), "results": results,
                             "batch_images": done.batch_images,
                             "timings_ms": {k: round(v, 2) for k, v in timings.items()}})

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def _upload(request: Request, exc: UploadError):
        if exc.log:
            log.info("%s: %s: refused (%d)", _peer(request), exc.log, exc.status)
        return _error(exc.status, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request, _exc):
        return _error(413, TOO_LARGE)

    @app.exception_handler(Refused)
    async def _refused(_request, exc: Refused):
        return _error(exc.status, str(exc))

    @app.exception_handler(BodyStalled)
    async def _stalled(request: Request, _exc):
        log.info("%s: request body cut: no data for too long", _peer(request))
        return _error(408, "request body stalled: nothing received for too long (see the limits in GET /v1/model)")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _exc):
        # Nobody is left to answer: one line in the log, not a traceback (the response goes nowhere).
        log.info("%s: client disconnected before its request was read", _peer(request))
        return _error(400, "client disconnected")

    @app.exception_handler(ServerBusy)
    async def _busy(_request, exc: ServerBusy):
        return _error(503, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        return _error(500, f"captioning failed: {type(exc).__name__}: {str(exc)[:200]}")


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "a client"


def _captions_openapi() -> dict:
    """The multipart form of POST /v1/captions for /docs (the endpoint parses it itself to reject unknowns)."""
    options = CaptionOptions.model_json_schema()["properties"]
    images = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "Image files."}
    schema = {"type": "object", "required": [IMAGES_FIELD], "properties": {IMAGES_FIELD: images, **options}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
