"""`capcli serve`: a bundle behind an HTTP API and a web page."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.cli.options import Provider
from capcli.console import out
from capcli.errors import CapcliError

# Images through the encoder at once (each is tens of MB of activations) and images waiting for it: bounded so a
# typo is one line, not an allocation failure under load.
MAX_SERVE_BATCH = 256
MAX_QUEUED = 4096


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CapcliError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CapcliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(
    bundle: Annotated[
        str | None, typer.Argument(help="Bundle folder (made by capcli export); default: the shipped Flickr8k model.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    provider: Provider = "auto",
    max_batch: Annotated[
        int, typer.Option(min=1, max=MAX_SERVE_BATCH, help="Most images in one encoder/decoder run.")
    ] = 16,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, max=60_000,
                            help="How long a request waits for others, still being read, to batch with.")
    ] = 5.0,
    max_files: Annotated[int, typer.Option(min=1, max=MAX_SERVE_BATCH, help="Most images in one request.")] = 16,
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="Largest image file accepted, in MB.")] = 20.0,
    max_queued: Annotated[
        int, typer.Option(min=1, max=MAX_QUEUED, help="Images waiting before requests get 503.")
    ] = 256,
    max_decode_mb: Annotated[float, typer.Option(
        min=1, max=1e6, help="Decoded-image memory of all concurrent decodes together, in MB (reserved from each "
        "image's header before decoding; an image needing more is refused).")] = 2000.0,
    max_inflight_mb: Annotated[float, typer.Option(
        min=1, max=1e6, help="Request bodies being received at once, all clients together, in MB (503 past it).")
    ] = 512.0,
    read_timeout: Annotated[float, typer.Option(
        min=0.1, max=3600, help="Seconds a request body may send nothing before it is cut (408).")] = 30.0,
    header_timeout: Annotated[float, typer.Option(
        min=0.1, max=3600, help="Seconds a connection may take to send a request's headers, counted from when "
        "it opens or its previous response was sent; past it the connection is closed (slow or silent clients).")
    ] = 10.0,
    max_connections: Annotated[int, typer.Option(
        min=1, max=1_000_000, help="Open connections at once, idle keep-alive ones included. One opened beyond "
        "it is answered 503 at once, its request unread, and closed; those already open are served as before.")
    ] = 512,
) -> None:
    """Serve a bundle over HTTP: POST /v1/captions, GET /v1/model, /healthz, a web page at / and docs at /docs."""
    import uvicorn

    from capcli.cli.caption import shipped_model
    from capcli.serve.app import ServeSettings, create_app

    bundle = bundle or shipped_model()

    settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_files=max_files,
                             max_image_bytes=int(max_image_mb * 1e6), max_queued=max_queued,
                             max_decode_bytes=int(max_decode_mb * 1e6), max_inflight_bytes=int(max_inflight_mb * 1e6),
                             read_timeout_s=read_timeout, header_timeout_s=header_timeout,
                             max_connections=max_connections)
    app = create_app(bundle, provider=provider, settings=settings)
    _check_port_free(host, port)
    out.print(f"serving {bundle} at http://{host}:{port}/ (API docs at /docs); Ctrl-C stops", markup=False)
    uvicorn.run(app, host=host, port=port, log_level="info", http=settings.http_protocol())
