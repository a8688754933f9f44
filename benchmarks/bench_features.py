"""Feature extraction images/s against the backbone's own forward on ready tensors (same run)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from capcli.data.readers import load_dataset
from capcli.data.synthetic import generate
from capcli.features import extract
from capcli.registry import get_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CAPCLI_CACHE"] = os.path.join(tmp, "cache")
        generate(os.path.join(tmp, "data"), n_images=args.images, seed=0)
        ds = load_dataset(os.path.join(tmp, "data"))
        spec = get_backbone(args.backbone)
        weights = "imagenet" if args.backbone == "efficientnet_lite0" else "none"

        # Same set-up as extraction uses (channels_last), so the ratio isolates loading.
        model = spec.build(weights).to(memory_format=torch.channels_last)
        s = spec.input_size
        ready = torch.randn(args.batch_size, 3, s, s).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            model(ready)  # warm-up
            n_batches = max(1, args.images // args.batch_size)
            t = time.perf_counter()
            for _ in range(n_batches):
                model(ready)
            forward_ips = n_batches * args.batch_size / (time.perf_counter() - t)

        t = time.perf_counter()
        extract(spec, ds, weights, batch_size=args.batch_size, workers=args.workers, device="cpu",
                show_progress=False)
        extract_ips = len(ds.images) / (time.perf_counter() - t)

    print(f"backbone {spec.name}, {args.images} images {s}x{s}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"forward on ready tensors : {forward_ips:8.1f} images/s")
    print(f"extraction (load+cache)  : {extract_ips:8.1f} images/s")
    print(f"ratio extraction/forward : {extract_ips / forward_ips:8.2f}  (1.00 = loading fully hidden)")


if __name__ == "__main__":
    main()
