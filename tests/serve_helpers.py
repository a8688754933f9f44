"""Helpers for the serving tests: run `capcli serve` as a real process on 127.0.0.1, make bad uploads."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).parents[1]
PHOTOS = sorted((ROOT / "tests" / "images").glob("*.jpg"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def running_server(bundle: Path, *options: str, python: str = sys.executable, pythonpath: bool = True,
                   startup_s: float = 120):
    """`capcli serve BUNDLE` in a child process on a free port; yields (base URL, process).

    pythonpath: run this checkout's capcli (False: the one installed for `python`, e.g. in a venv).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    cmd = [python, "-m", "capcli", "serve", str(bundle), "--port", str(port), "--provider", "cpu", *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"capcli serve exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("capcli serve did not answer /healthz in time")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def bad_uploads(max_image_bytes: int, max_files: int, max_body_bytes: int) -> dict[str, tuple[dict, int, str]]:
    """name -> (httpx request kwargs, expected status, a phrase the error must contain)."""
    photo = PHOTOS[0].read_bytes()
    one = {"images": ("ok.jpg", photo, "image/jpeg")}
    return {
        "not an image": ({"files": {"images": ("notes.txt", b"just some text\n" * 20, "text/plain")}}, 400,
                         "notes.txt: not an image"),
        "truncated": ({"files": {"images": ("half.jpg", photo[: len(photo) // 2], "image/jpeg")}}, 400,
                      "half.jpg"),
        "empty": ({"files": {"images": ("empty.png", b"", "image/png")}}, 400, "empty.png: empty file"),
        "decompression bomb": ({"files": {"images": ("bomb.png", png_bytes((12_000, 12_000), "1"), "image/png")}},
                               400, "decompression bomb"),
        "too large": ({"files": {"images": ("big.bin", b"\xff" * (max_image_bytes + 1), "image/jpeg")}}, 413,
                      "over the limit"),
        "too many files": ({"files": [("images", (f"{i}.jpg", photo, "image/jpeg")) for i in range(max_files + 1)]},
                           400, "Too many files"),
        "body too large": ({"files": {"images": ("huge.jpg", b"\0" * (max_body_bytes + 1),
                                                 "image/jpeg")}}, 413, "request body too large"),
        "unknown option": ({"files": one, "data": {"beam_width": "3"}}, 422, "unknown option 'beam_width'"),
        "bad option value": ({"files": one, "data": {"beam_size": "0"}}, 422, "beam_size"),
        "n_best over beam": ({"files": one, "data": {"beam_size": "2", "n_best": "3"}}, 422, "n_best"),
        "no images": ({"data": {"beam_size": "3"}}, 400, "no images"),
        "wrong field": ({"files": {"photo": ("a.jpg", photo, "image/jpeg")}}, 422, "'images' field"),
        "not multipart": ({"json": {"images": "a.jpg"}}, 400, "no images"),
    }
