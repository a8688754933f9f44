"""int8 bundles against float32 ones: bundle size, encoder speed on ONNX Runtime CPU, captions.

For each backbone a short run on the synthetic set is exported twice, float32 and `--quantize int8`
(calibrated on its training split), and both bundles are measured in this one run: bundle size on disk,
encoder milliseconds per batch of --batch images on the CPU provider (float and int8 timed in turn, the
median of --reps each), and for efficientnet_lite0 (real imagenet weights) the captions of the synthetic
test split: the share identical to the float bundle's, and CIDEr-D of both. The torchvision three have no
weights offline (weights none), so their captions say nothing: they report size and speed only, with a
decoder that was never trained (the bundle's size and the encoder's speed do not depend on training).
`--run runs/demo` quantizes the demo's run for efficientnet_lite0's row instead of training a short one: how
often captions survive int8 depends on how well the model was trained, and the demo's is the one users see.

Targets (issue 12): size <= 30 % of float32, encoder >= 2x faster, agreement >= 90 %, CIDEr-D within 3 %.
The export's own tolerance is switched off here, so a bundle that misses a target is still measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BACKBONES = ("efficientnet_lite0", "vgg16", "resnet152", "inceptionv3")
REAL_WEIGHTS = {"efficientnet_lite0": "imagenet"}  # the others: weights none (hub downloads are not offline)


def make_dataset(folder: Path, images: int) -> Path:
    from capcli.data.synthetic import generate

    if not folder.exists():
        generate(folder, n_images=images, seed=0)
    return folder


def train_run(backbone: str, data: Path, out: Path, args) -> Path:
    """efficientnet_lite0: a short training run. The others: a decoder never trained (with random backbone
    weights, training says nothing; resnet152's random features even overflow the float16 feature cache),
    saved as a run of the synthetic set, whose training split then calibrates the int8 encoder."""
    if backbone in REAL_WEIGHTS:
        from capcli.train.config import TrainConfig
        from capcli.train.loop import train

        cfg = TrainConfig(
            backbone=backbone, dataset=str(data), weights=REAL_WEIGHTS[backbone], out=str(out), epochs=args.epochs,
            hidden_dim=args.hidden_dim, embed_dim=args.embed_dim, threshold=2, device="cpu", decoder="pooled",
            val_sample=50,
        )
        return train(cfg, show_progress=False)
    return untrained_run(backbone, data, out, args)


def untrained_run(backbone: str, data: Path, out: Path, args) -> Path:
    import torch

    from capcli.data.readers import load_dataset
    from capcli.data.text import Vocabulary
    from capcli.model import checkpoint
    from capcli.model.pooled import CaptionDecoder, DecoderConfig
    from capcli.registry import get_backbone

    spec = get_backbone(backbone)
    ds = load_dataset(str(data), seed=0)
    vocab = Vocabulary.build([c for n in ds.splits["train"] for c in ds.captions[n]], threshold=2)
    torch.manual_seed(0)
    cfg = DecoderConfig(feature_dim=spec.feature_dim, vocab_size=len(vocab), embed_dim=args.embed_dim,
                        hidden_dim=args.hidden_dim, dropout=0.0)
    decoder = CaptionDecoder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    train_config = {"dataset": str(data), "images": None, "seed": 0, "backbone": backbone}
    checkpoint.save(out / "best.pt", {
        "config": cfg.to_dict(), "model": decoder.state_dict(), "vocab": vocab.to_json(), "decoder": "pooled",
        "vocab_sha256": vocab.sha256, "backbone": backbone, "weights": "none", "feature_dim": spec.feature_dim,
        "preprocessing": spec.preprocessing.to_dict(), "max_len": 20, "dataset": str(data),
        "dataset_fingerprint": None, "train_config": train_config, "epoch": 0, "history": [],
    })
    return out


def given_run(run: Path, backbone: str) -> tuple[Path, Path]:
    """A finished run of `backbone` (e.g. `capcli demo`'s runs/demo) and the dataset it was trained on."""
    from capcli.model import checkpoint

    ckpt = checkpoint.load(run / "best.pt")
    if ckpt["backbone"] != backbone:
        raise SystemExit(f"--run {run} is a run of {ckpt['backbone']}, not {backbone}")
    return run, Path(ckpt["train_config"]["dataset"])


def bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def encoder_ms(float_bundle: Path, int8_bundle: Path, batch: np.ndarray, reps: int) -> tuple[float, float]:
    """Median ms per batch of each encoder on ONNX Runtime's CPU provider, timed in turn so load hits both."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(b / "encoder.onnx"), providers=["CPUExecutionProvider"])
                for b in (float_bundle, int8_bundle)]
    times: list[list[float]] = [[], []]
    for s in sessions:  # warm-up
        s.run(None, {"images": batch})
    for _ in range(reps):
        for s, t in zip(sessions, times, strict=True):
            start = time.perf_counter()
            s.run(None, {"images": batch})
            t.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def test_split_captions(float_bundle: Path, int8_bundle: Path, data: Path) -> dict:
    """Both bundles' captions of the test split (beam 3, as `capcli caption`), compared and scored."""
    from capcli.bundle.judge import PARITY_BEAM, caption_parity
    from capcli.data.readers import load_dataset
    from capcli.runtime.captioner import caption_images, open_captioner

    ds = load_dataset(str(data), seed=0)
    names = [n for n in ds.splits["test"] if ds.image_path(n).is_file()]
    caps = []
    for b in (float_bundle, int8_bundle):
        results = caption_images(open_captioner(b, "onnx", provider="cpu"), [ds.image_path(n) for n in names],
                                 beam_size=PARITY_BEAM, batch_size=16)
        caps.append({n: r.caption or "" for n, r in zip(names, results, strict=True)})
    return caption_parity(ds, caps[0], caps[1])


def measure(backbone: str, tmp: Path, args) -> dict:
    from capcli.backbone import Preprocessing
    from capcli.bundle.build import export
    from capcli.bundle.judge import Tolerance
    from capcli.bundle.manifest import read_manifest
    from capcli.data.readers import load_dataset
    from capcli.images import load_input

    real = backbone in REAL_WEIGHTS
    t0 = time.perf_counter()
    if real and args.run:
        run, data = given_run(Path(args.run), backbone)
    else:
        data = make_dataset(tmp / f"data-{args.images if real else args.other_images}",
                            args.images if real else args.other_images)
        run = train_run(backbone, data, tmp / f"run-{backbone}", args)
    t1 = time.perf_counter()
    float_bundle = export(run, tmp / f"{backbone}-float32", exporter=args.exporter)
    t2 = time.perf_counter()
    int8_bundle = export(run, tmp / f"{backbone}-int8", exporter=args.exporter, quantize="int8",
                         calibration=args.calibration, tolerance=Tolerance(0.0, 100.0))
    t3 = time.perf_counter()
    ds = load_dataset(str(data), seed=0)
    prep = Preprocessing.from_dict(read_manifest(float_bundle)["preprocessing"])
    names = (ds.splits["test"] + ds.splits["train"])[: args.batch]
    batch = np.stack([load_input(ds.image_path(n), prep) for n in names]).astype(np.float32)
    ms = encoder_ms(float_bundle, int8_bundle, batch, args.reps)
    row = {"backbone": backbone, "size": (bundle_bytes(float_bundle), bundle_bytes(int8_bundle)), "ms": ms,
           "captions": test_split_captions(float_bundle, int8_bundle, data) if real else None,
           "seconds": (t1 - t0, t2 - t1, t3 - t2)}
    what = "given run" if real and args.run else "trained" if real else "untrained decoder"
    print(f"  {backbone}: {what} {row['seconds'][0]:.0f}s, float export {row['seconds'][1]:.0f}s, "
          f"int8 export {row['seconds'][2]:.0f}s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--images", type=int, default=500,
                    help="synthetic images for efficientnet_lite0 (10%% are the test split captioned)")
    ap.add_argument("--other-images", type=int, default=60,
                    help="synthetic images for the weights-none backbones (size and speed only)")
    ap.add_argument("--epochs", type=int, default=4, help="efficientnet_lite0's training")
    ap.add_argument("--run", help="a finished efficientnet_lite0 run to quantize instead of a short one trained "
                                  "here, e.g. runs/demo after `capcli demo` (its dataset's test split is captioned)")
    ap.add_argument("--hidden-dim", type=int, default=256)
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=300, help="training images calibrating the int8 encoder")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--batch", type=int, default=8, help="images per encoder run")
    ap.add_argument("--reps", type=int, default=10, help="timed encoder runs per bundle (median)")
    ap.add_argument("--keep", help="keep runs and bundles in this folder (default: a temporary one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        os.environ["CAPCLI_CACHE"] = str(tmp / "cache")
        rows = [measure(b, tmp, args) for b in args.backbones]

    print(f"\nint8 vs float32 bundles; encoder ms per batch of {args.batch} on ONNX Runtime CPU "
          f"(median of {args.reps}); captions: beam 3 on the synthetic test split")
    head = (f"{'backbone':19} {'MiB f32':>8} {'int8':>7} {'ratio':>6} {'ms f32':>8} {'int8':>7} {'speed-up':>8} "
            f"{'agree':>6} {'CIDEr f32':>9} {'int8':>6} {'change':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        (sf, sq), (tf, tq) = r["size"], r["ms"]
        line = (f"{r['backbone']:19} {sf / 2**20:8.1f} {sq / 2**20:7.1f} {sq / sf:6.1%} {tf:8.1f} {tq:7.1f} "
                f"{tf / tq:7.2f}x")
        c = r["captions"]
        if c is None:
            line += f" {'-':>6} {'-':>9} {'-':>6} {'-':>7}"
        else:
            f, q = c["scores"]["float32"]["CIDEr-D"], c["scores"]["int8"]["CIDEr-D"]
            line += (f" {c['agreement_percent']:5.1f}% {f:9.1f} {q:6.1f} {0.0 - c['cider_loss_percent']:+6.1f}%"
                     f"  ({c['images']} images)")
        print(line)
    print("targets: int8 size <= 30% of float32, encoder speed-up >= 2x, agreement >= 90%, CIDEr-D within 3%")


if __name__ == "__main__":
    main()
