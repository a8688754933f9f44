"""Feature extraction images/s: ONNX Runtime against PyTorch, and against ONNX Runtime's own forward on ready
tensors, at its best of one run over all cores and the concurrent runs extraction uses on a small CPU (how
much of the image loading is hidden). All figures from one run.

Each measurement is repeated (--repeats, interleaved) and the best of each is kept: on a shared machine the
best run is the one least disturbed by others.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from capcli.data.readers import load_dataset
from capcli.data.synthetic import generate
from capcli.features import engines
from capcli.features.cache import cache_dir
from capcli.features.extraction import extract
from capcli.registry import get_backbone


def extraction_rate(spec, weights, ds, engine: str, batch_size: int, workers: int | None) -> float:
    shutil.rmtree(cache_dir(spec, weights, ds), ignore_errors=True)
    t = time.perf_counter()
    extract(spec, ds, weights, batch_size=batch_size, workers=workers, device="cpu", show_progress=False,
            engine=engine)
    return len(ds.images) / (time.perf_counter() - t)


def forward_rate(extractor, ready, n_batches: int) -> float:
    """images/s of `extractor` on tensors already loaded, with as many batches in flight as it runs at once."""
    extractor(ready)  # warm-up
    t = time.perf_counter()
    in_flight = [extractor.submit(ready) for _ in range(min(extractor.runs, n_batches))]
    for _ in range(n_batches - len(in_flight)):
        in_flight.pop(0).result()
        in_flight.append(extractor.submit(ready))
    for future in in_flight:
        future.result()
    return n_batches * len(ready) / (time.perf_counter() - t)


def bench(name: str, ds, n_images: int, batch_size: int, workers: int | None, repeats: int) -> dict:
    spec = get_backbone(name)
    weights = "imagenet" if name == "efficientnet_lite0" else "none"
    t = time.perf_counter()
    engines.export_graph(spec, weights)
    export_s = time.perf_counter() - t
    ready = engines.example_pixels(spec, batch_size)  # loaded, resized and cropped: what the workers deliver
    n_batches = max(1, n_images // batch_size)
    # ONNX Runtime's forward at its best on ready tensors: one run over all cores, or the concurrent
    # single-threaded runs extraction uses on a small CPU (engines.cpu_runs); the faster is the baseline.
    onnx_forwards = {"one run, all cores": engines.make_extractor(spec, weights, "onnx", "cpu",
                                                                 threads=os.cpu_count()),
                     "extraction's runs": engines.make_extractor(spec, weights, "onnx", "cpu")}
    torch_forward = engines.make_extractor(spec, weights, "torch", "cpu")
    best: dict[str, float] = {}
    for _ in range(repeats):
        rates = {
            "torch extraction": extraction_rate(spec, weights, ds, "torch", batch_size, workers),
            "onnx extraction": extraction_rate(spec, weights, ds, "onnx", batch_size, workers),
            **{f"onnx forward ({k})": forward_rate(e, ready, n_batches) for k, e in onnx_forwards.items()},
            "torch forward": forward_rate(torch_forward, ready, n_batches),
        }
        best = {k: max(v, best.get(k, 0.0)) for k, v in rates.items()}
    best["onnx forward"] = max(v for k, v in best.items() if k.startswith("onnx forward ("))
    return {"spec": spec, "weights": weights, "export_s": export_s, "runs": onnx_forwards["extraction's runs"].runs,
            **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet152"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: capcli's choice)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CAPCLI_CACHE"] = os.path.join(tmp, "cache")
        generate(os.path.join(tmp, "data"), n_images=args.images, seed=0)
        ds = load_dataset(os.path.join(tmp, "data"))
        results = [bench(name, ds, args.images, args.batch_size, args.workers, args.repeats)
                   for name in args.backbones]

    print(f"{args.images} synthetic images, batch {args.batch_size}, cpus {os.cpu_count()}, torch threads "
          f"{torch.get_num_threads()}, workers {args.workers if args.workers is not None else 'default'}, "
          f"best of {args.repeats}")
    for r in results:
        spec = r["spec"]
        print(f"\n{spec.name} ({r['weights']}) {spec.input_size}x{spec.input_size}, graph export once: "
              f"{r['export_s']:.1f} s")
        print(f"  ONNX Runtime extraction: {r['runs']} run(s) at once")
        keys = ["torch extraction", "onnx extraction", "torch forward"] + [
            k for k in r if k.startswith("onnx forward (")]
        for key in keys:
            print(f"  {key:<36}: {r[key]:8.1f} images/s")
        print(f"  ONNX Runtime extraction / PyTorch extraction : {r['onnx extraction'] / r['torch extraction']:5.2f}x"
              "  (target >= 2)")
        print(f"  ONNX Runtime extraction / its faster forward : {r['onnx extraction'] / r['onnx forward']:5.2f}x"
              "  (target >= 0.9; 1.00 = loading fully hidden)")


if __name__ == "__main__":
    main()
