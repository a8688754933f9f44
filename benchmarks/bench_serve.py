"""`capcli serve` throughput and latency at concurrency 1, 4 and 16; micro-batching against none.

Starts `capcli serve` on 127.0.0.1 (a free port) and sends a fixed number of caption requests (one photo each,
beam 3) from N client threads. Target: at concurrency 16, >= 2x the requests/s of concurrency 1. The same
concurrency 16 against a server with --max-batch 1 shows what the batching itself brings.

Bundle: --bundle, else exported/demo when present, else a small one trained here on synthetic images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve_helpers import PHOTOS, running_server  # noqa: E402


def small_bundle(tmp: str) -> Path:
    from capcli.bundle.build import export
    from capcli.data.synthetic import generate
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    os.environ["CAPCLI_CACHE"] = os.path.join(tmp, "cache")
    generate(os.path.join(tmp, "data"), n_images=300, seed=0)
    run = train(TrainConfig(backbone="efficientnet_lite0", dataset=os.path.join(tmp, "data"), out=os.path.join(
        tmp, "run"), epochs=3, hidden_dim=256, embed_dim=128, threshold=2, device="cpu"), show_progress=False)
    return export(run, os.path.join(tmp, "bundle"))


def load(url: str, clients: int, requests: int) -> tuple[float, np.ndarray, list[dict]]:
    """requests/s, latencies (s) and the server's answers, for `requests` spread over `clients` threads."""
    photos = [(p.name, p.read_bytes()) for p in PHOTOS]
    latencies: list[float] = []
    answers: list[dict] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for i in range(index, requests, clients):
                name, data = photos[i % len(photos)]
                t = time.perf_counter()
                response = http.post("/v1/captions", files={"images": (name, data, "image/jpeg")},
                                     data={"beam_size": "3"})
                elapsed = time.perf_counter() - t
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed)
                    answers.append(response.json())

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return requests / (time.perf_counter() - started), np.array(latencies), answers


def row(label: str, rps: float, lat: np.ndarray, answers: list[dict]) -> str:
    """Client-side figures, then the server's own mean timings per request (ms) and its batches."""
    p50, p99 = np.percentile(lat, [50, 99]) * 1e3
    mean = {k: np.mean([a["timings_ms"][k] for a in answers]) for k in ("read", "queue", "encode", "decode")}
    batch = np.mean([a["batch_images"] for a in answers])
    return (f"{label:22} {rps:7.1f} {p50:7.0f} {p99:7.0f} {batch:6.1f} "
            + " ".join(f"{mean[k]:7.0f}" for k in ("read", "queue", "encode", "decode")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", help="Bundle folder (default exported/demo, else a small one made here).")
    ap.add_argument("--requests", type=int, default=96, help="Requests per concurrency level.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = ROOT / "exported" / "demo"
        bundle = Path(args.bundle) if args.bundle else demo if demo.is_dir() else small_bundle(tmp)
        print(f"bundle {bundle}; {args.requests} requests per level, one photo each, beam 3; "
              f"{os.cpu_count()} CPUs (shared machine: figures under load)")
        print(f"{'':22} {'client':>23}   {'server, mean per request (ms)':>38}")
        print(f"{'server, concurrency':22} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6} {'read':>7} "
              f"{'queue':>7} {'encoder':>7} {'decoder':>7}")
        rps = {}
        with running_server(bundle) as (url, _):
            load(url, 4, 8)  # warm-up
            for clients in (1, 4, 16):
                rps[clients], lat, answers = load(url, clients, args.requests)
                print(row(f"micro-batching, {clients}", rps[clients], lat, answers), flush=True)
        with running_server(bundle, "--max-batch", "1") as (url, _):
            load(url, 4, 8)
            unbatched, lat, answers = load(url, 16, args.requests)
            print(row("--max-batch 1, 16", unbatched, lat, answers))
        print(f"requests/s at concurrency 16 / concurrency 1: {rps[16] / rps[1]:.2f}x (target >= 2x)")
        print(f"micro-batching / --max-batch 1, both at concurrency 16: {rps[16] / unbatched:.2f}x")


if __name__ == "__main__":
    main()
