"""`capcli serve` under load, then under hostile images: requests served, errors, and the server's memory.

Starts `capcli serve` on 127.0.0.1 (loopback only, a free port) and runs two bounded phases:
  1. load: 64 clients post a photo each (beam 3), over and over, for 20 s;
  2. hostile: 3 clients at once each post a 9000x9000 RGBA PNG (about 300 kB on the wire, 81 megapixels:
     under the pixel limit, 324 MB once decoded), twice.
The server's RSS is sampled every 50 ms: its plateau after the load phase, the peak during the hostile one,
and where it settles 5 s after the burst. The issue's figures on the server before its limits: 1.7 GB, 4.9 GB
at the peak, 3.4 GB after.

Bundle: --bundle, else exported/demo when present, else an untrained one exported here (efficientnet_lite0; the
captions are noise but the server's work per request is that of a trained model of that size).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]
PHOTOS = sorted((ROOT / "tests" / "images").glob("*.jpg"))
HOST = "127.0.0.1"  # never any other address: the benchmark opens no port beyond this machine


def untrained_bundle(tmp: Path) -> Path:
    """A random-weight pooled decoder on efficientnet_lite0, exported: a bundle in about a minute, no training."""
    import torch

    from capcli.bundle.build import export
    from capcli.data.text import Vocabulary
    from capcli.model import checkpoint
    from capcli.model.pooled import CaptionDecoder, DecoderConfig
    from capcli.registry import get_backbone

    spec = get_backbone("efficientnet_lite0")
    words = "a dog runs on the grass man in red shirt two children play ball water beach".split()
    vocab = Vocabulary.build([" ".join(words)], threshold=1)
    torch.manual_seed(0)
    cfg = DecoderConfig(feature_dim=spec.feature_dim, vocab_size=len(vocab), embed_dim=256, hidden_dim=512,
                        num_layers=1, dropout=0.0)
    run = tmp / "run"
    run.mkdir()
    checkpoint.save(run / "best.pt", {
        "config": cfg.to_dict(), "model": CaptionDecoder(cfg).state_dict(), "vocab": vocab.to_json(),
        "vocab_sha256": vocab.sha256, "backbone": spec.name, "weights": "none", "feature_dim": spec.feature_dim,
        "preprocessing": spec.preprocessing.to_dict(), "max_len": 20, "dataset": "none",
        "dataset_fingerprint": None, "train_config": {"dataset": "none", "seed": 0}, "epoch": 0, "history": [],
    })
    return export(run / "best.pt", tmp / "bundle", images=PHOTOS, exporter="torchscript")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Sampler(threading.Thread):
    """The server's RSS every 50 ms; `peak_since(mark)` is the largest sample since `mark()`."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stopped = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return

    def mark(self) -> None:
        self.peak = rss_bytes(self.pid)


def post(http: httpx.Client, name: str, data: bytes, kind: str) -> int:
    try:
        return http.post("/v1/captions", files={"images": (name, data, kind)}, data={"beam_size": "3"}).status_code
    except httpx.HTTPError:
        return -1


def load_phase(url: str, clients: int, seconds: float) -> tuple[int, dict[int, int]]:
    """(requests answered 200, {status or -1: count} of the others) for `clients` looping until the deadline."""
    photos = [(p.name, p.read_bytes()) for p in PHOTOS]
    served, errors, lock = [0], {}, threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            i = index
            while time.monotonic() < deadline:
                name, data = photos[i % len(photos)]
                status = post(http, name, data, "image/jpeg")
                with lock:
                    if status == 200:
                        served[0] += 1
                    else:
                        errors[status] = errors.get(status, 0) + 1
                i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served[0], errors


def hostile_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (9000, 9000), (200, 40, 40, 128)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def hostile_phase(url: str, image: bytes, clients: int, rounds: int) -> tuple[list[int], float]:
    statuses: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for _ in range(rounds):
                status = post(http, "wide.png", image, "image/png")
                with lock:
                    statuses.append(status)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Bundle folder (default exported/demo, else an untrained one made here).")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--hostile-clients", type=int, default=3)
    ap.add_argument("--hostile-rounds", type=int, default=2)
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or not 1 <= args.seconds <= 120 or not 1 <= args.hostile_clients <= 16:
        ap.error("keep it bounded: --clients 1..256, --seconds 1..120, --hostile-clients 1..16")
    with tempfile.TemporaryDirectory() as tmp:
        demo = ROOT / "exported" / "demo"
        bundle = Path(args.bundle) if args.bundle else demo if demo.is_dir() else untrained_bundle(Path(tmp))
        image = hostile_png()
        port = free_port()
        log_path = Path(tmp) / "server.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "w") as log:  # a file, not a pipe: the access log must never block the server
            server = subprocess.Popen([sys.executable, "-m", "capcli", "serve", str(bundle), "--host", HOST,
                                       "--port", str(port), "--provider", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                                      env=env)
        url = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"capcli serve exited {server.returncode}:\n{log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("capcli serve did not answer /healthz within 180 s")
                time.sleep(0.3)
            sampler = Sampler(server.pid)
            sampler.start()
            started_rss = rss_bytes(server.pid)
            print(f"bundle {bundle}; server pid {server.pid} on {url}; {os.cpu_count()} CPUs (shared machine)")
            print(f"hostile image: 9000x9000 RGBA PNG, {len(image) / 1e3:.0f} kB")
            print(f"server RSS at start: {started_rss / 1e6:,.0f} MB")

            sampler.mark()
            served, errors = load_phase(url, args.clients, args.seconds)
            load_peak = sampler.peak
            time.sleep(3)
            plateau = rss_bytes(server.pid)
            print(f"load: {args.clients} clients for {args.seconds:g} s: {served} requests served "
                  f"({served / args.seconds:.1f}/s), errors {sum(errors.values())} {errors or ''}".rstrip())
            print(f"  RSS peak {load_peak / 1e6:,.0f} MB; plateau 3 s after: {plateau / 1e6:,.0f} MB")

            sampler.mark()
            statuses, took = hostile_phase(url, image, args.hostile_clients, args.hostile_rounds)
            hostile_peak = sampler.peak
            time.sleep(5)
            after = rss_bytes(server.pid)
            ok = statuses.count(200)
            print(f"hostile: {args.hostile_clients} clients x {args.hostile_rounds} images in {took:.1f} s: "
                  f"{ok} served, errors {len(statuses) - ok} {sorted(set(statuses) - {200}) or ''}".rstrip())
            print(f"  RSS peak {hostile_peak / 1e6:,.0f} MB; after the burst (5 s): {after / 1e6:,.0f} MB "
                  f"({(after - plateau) / 1e6:+,.0f} MB against the plateau)")
            check = httpx.post(f"{url}/v1/captions", timeout=60,
                               files={"images": (PHOTOS[0].name, PHOTOS[0].read_bytes(), "image/jpeg")})
            print(f"a photo after the burst: HTTP {check.status_code}")
            sampler.stopped.set()
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        text = log_path.read_text(errors="replace")
        print(f"server log: {text.count('Traceback')} tracebacks, {text.count('ERROR')} ERROR lines")


if __name__ == "__main__":
    main()
