"""Caption latency: decode time as a share of encoder time (greedy, beam 3); ONNX Runtime vs PyTorch eager.

For each decoder kind (pooled, attention) exports a bundle from a briefly trained demo-sized run
(efficientnet_lite0 on synthetic data) unless --bundle and --run are given.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from capcli.runtime.captioner import decode_states, open_captioner, start_batch


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def prepare(tmp: str, decoder: str) -> tuple[Path, Path]:
    from capcli.bundle.build import export
    from capcli.data.synthetic import generate
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    os.environ["CAPCLI_CACHE"] = os.path.join(tmp, "cache")
    data = os.path.join(tmp, "data")
    if not os.path.isdir(data):
        generate(data, n_images=300, seed=0)
    run = train(TrainConfig(backbone="efficientnet_lite0", dataset=data, out=os.path.join(tmp, f"run-{decoder}"),
                            epochs=3, hidden_dim=256, embed_dim=128, threshold=2, device="cpu", decoder=decoder),
                show_progress=False)
    return run, export(run, os.path.join(tmp, f"bundle-{decoder}"))


def batch_of(captioner, args) -> np.ndarray:
    """A batch of --photos (preprocessed as captioning does), or of random pixels."""
    if args.photos:
        from capcli.images import load_input

        paths = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        paths = (paths * args.batch)[: args.batch]
        return np.stack([load_input(p, captioner.preprocessing) for p in paths])
    size = captioner.preprocessing.input_size
    return np.random.default_rng(0).standard_normal((args.batch, 3, size, size), dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle")
    ap.add_argument("--run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--photos", help="a folder of photos to caption (default: random pixels)")
    ap.add_argument("--decoders", default="pooled,attention", help="decoder kinds to train (without --bundle)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = ({"given": (Path(args.run), Path(args.bundle))} if args.bundle else
                  {kind: prepare(tmp, kind) for kind in args.decoders.split(",")})
        rows = {}
        for kind, (run, bundle) in models.items():
            for runtime, model in (("onnx", bundle), ("torch", run)):
                cap = open_captioner(model, runtime=runtime, provider="cpu")
                images = batch_of(cap, args)
                state, context = start_batch(cap, images)
                enc = timed(lambda c=cap, x=images: start_batch(c, x), args.reps)
                greedy = timed(lambda c=cap, s=state, x=context: decode_states(c, s, 1, context=x), args.reps)
                beam = timed(lambda c=cap, s=state, x=context: decode_states(c, s, 3, context=x), args.reps)
                rows[kind, runtime] = (enc, greedy, beam)
        print(f"batch of {args.batch} images, times per batch (ms)")
        print(f"{'decoder':10} {'runtime':8} {'encoder':>9} {'greedy':>9} {'beam 3':>9} {'greedy/enc':>11} "
              f"{'beam3/enc':>10}")
        for (kind, runtime), (enc, greedy, beam) in rows.items():
            print(f"{kind:10} {runtime:8} {enc * 1e3:9.1f} {greedy * 1e3:9.1f} {beam * 1e3:9.1f} "
                  f"{greedy / enc:10.0%} {beam / enc:10.0%}")
        for kind in models:
            o, t = rows[kind, "onnx"], rows[kind, "torch"]
            print(f"{kind}: ONNX Runtime speed-up over PyTorch eager: encoder {t[0] / o[0]:.2f}x, greedy decode "
                  f"{t[1] / o[1]:.2f}x, beam-3 decode {t[2] / o[2]:.2f}x, "
                  f"encoder+beam3 {(t[0] + t[2]) / (o[0] + o[2]):.2f}x")


if __name__ == "__main__":
    main()
