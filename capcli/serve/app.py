"""The HTTP front end: FastAPI app over the captioning pipeline (a bundle, ONNX Runtime, micro-batching).

POST /v1/captions (multipart images + decoding options), GET /v1/model, GET /healthz, the web page at /
and OpenAPI docs at /docs. A request the client got wrong is answered 4xx with {"error": "..."}; nothing a
client sends stops the server.
"""

from __future__ import annotations

import asyncio
import time
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
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from capcli import __version__
from capcli.bundle import read_manifest
from capcli.caption import open_captioner
from capcli.serve.batcher import DecodeOptions, MicroBatcher, ServerBusy
from capcli.serve.uploads import UploadError, check_size, display_name, image_input

STATIC = files("capcli.serve") / "static"
IMAGES_FIELD = "images"
MAX_BEAM = 16
TOO_LARGE = "request body too large (see the limits in GET /v1/model)"


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server: batching, and what a request may carry."""

    max_batch: int = 16  # images per encoder/decoder run
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others still being read
    max_files: int = 16  # images per request
    max_image_bytes: int = 20_000_000
    max_queued: int = 256  # images waiting before requests are turned away (503)

    @property
    def max_body_bytes(self) -> int:
        """A request body larger than every allowed image plus room for the form is refused unread."""
        return self.max_files * self.max_image_bytes + 1_000_000


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

    @model_validator(mode="after")
    def _n_best_within_beam(self) -> CaptionOptions:
        if self.sample and self.n_best > 1:
            raise ValueError(f"n_best ({self.n_best}) needs beam search; sample=true gives one caption per image")
        if not self.sample and self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) cannot exceed beam_size ({self.beam_size})")
        return self


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: stops reading a request body past `limit` bytes (413), streamed or not."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:  # refused before a byte of it is read
            return await _error(413, TOO_LARGE)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)


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


def image_result(name: str, hypotheses: list) -> dict:
    alternatives = [hypothesis_json(h) for h in hypotheses]
    best = alternatives[0]
    return {"filename": name, **best, "alternatives": alternatives}


async def _read_uploads(request: Request, settings: ServeSettings) -> tuple[list[tuple[str, bytes]], dict]:
    form = await request.form(max_files=settings.max_files, max_fields=64)
    uploads, fields = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            name = display_name(value.filename, len(uploads))
            if key != IMAGES_FIELD:
                raise UploadError(f"{name}: files go in the '{IMAGES_FIELD}' field, not '{key}'", 422)
            check_size(name, value.size or 0, settings.max_image_bytes)
            uploads.append((name, await value.read()))
        elif key in fields:
            raise UploadError(f"option '{key}' given more than once", 422)
        else:
            fields[key] = value
    await form.close()
    if not uploads:
        raise UploadError(f"no images: send them as multipart/form-data files in the field '{IMAGES_FIELD}'")
    return uploads, fields


def _parse_options(fields: dict, vocab_size: int) -> DecodeOptions:
    try:
        options = CaptionOptions(**fields)
    except ValidationError as exc:
        raise UploadError(_options_message(exc), 422) from None
    if options.top_k > vocab_size:
        raise UploadError(f"top_k: at most the vocabulary's {vocab_size} words, got {options.top_k}", 422)
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
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    captioner = open_captioner(bundle, runtime="onnx", provider=provider)
    batcher = MicroBatcher(captioner, settings.max_batch, settings.max_wait_ms / 1e3, settings.max_queued,
                           wait_for_readers=True)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="capcli", version=__version__, lifespan=lifespan,
                  description=f"Image captions from the bundle `{bundle.name}` ({manifest['backbone']}).")
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
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
            options = _parse_options(fields, manifest["vocab_size"])
            images = await run_in_threadpool(
                lambda: np.stack([image_input(data, name, captioner.preprocessing) for name, data in uploads]))
            read_ms = (time.perf_counter() - started) * 1e3
            answer = reading.submit(images, options)
        done = await asyncio.wrap_future(answer)
        timings = {"read": read_ms, **done.timings_ms, "total": (time.perf_counter() - started) * 1e3}
        results = [image_result(name, hyps) for (name, _), hyps in zip(uploads, done.hypotheses, strict=True)]
        return JSONResponse({"model": bundle.name, "options": asdict(options), "results": results,
                             "batch_images": done.batch_images,
                             "timings_ms": {k: round(v, 2) for k, v in timings.items()}})

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def _upload(_request, exc: UploadError):
        return _error(exc.status, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request, _exc):
        return _error(413, TOO_LARGE)

    @app.exception_handler(ServerBusy)
    async def _busy(_request, exc: ServerBusy):
        return _error(503, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        return _error(500, f"captioning failed: {type(exc).__name__}: {str(exc)[:200]}")


def _captions_openapi() -> dict:
    """The multipart form of POST /v1/captions for /docs (the endpoint parses it itself to reject unknowns)."""
    options = CaptionOptions.model_json_schema()["properties"]
    images = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "Image files."}
    schema = {"type": "object", "required": [IMAGES_FIELD], "properties": {IMAGES_FIELD: images, **options}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
