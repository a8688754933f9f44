"""Pooled vs attention decoder on the same synthetic set: accuracy on its test split, decode and training cost.

Both decoders are trained with the demo's settings on efficientnet_lite0 features (pooled vector vs 7x7 grid),
exported, and evaluated with ONNX Runtime, beam 3, on the test split. The last two accuracy columns are
checkable truth from the generator: the main object's colour+shape, and every colour+shape pair the caption names.
Decode time is beam 3 on a batch of test images, beside the encoder's time for the same batch; training
s/epoch and tokens/s are medians over epochs (robust to a shared machine). With --work, an interrupted run
resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_caption import timed  # this folder is on sys.path when a benchmark is run as a script


def train_and_export(kind: str, data: Path, work: Path, args) -> tuple[Path, Path, list[dict]]:
    from capcli.bundle.build import export
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    out = work / f"run-{kind}"
    resume = (out / "last.pt").is_file()  # an interrupted benchmark with --work goes on where it stopped
    run = train(TrainConfig(backbone="efficientnet_lite0", dataset=str(data), weights="imagenet",
                            out=str(out), epochs=args.epochs, batch_size=64, hidden_dim=256, embed_dim=128,
                            patience=3, decoder=kind, device="cpu", seed=args.seed, resume=resume,
                            **({} if args.dropout is None else {"dropout": args.dropout})),
                show_progress=False)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, export(run, work / f"bundle-{kind}", force=True), history


def scst_after(kind: str, baseline: str, run: Path, work: Path, args) -> tuple[Path, Path, list[dict]]:
    """The cross-entropy run fine-tuned with self-critical training (in a copy of its folder), exported."""
    import shutil

    from capcli.bundle.build import export
    from capcli.train.scst import ScstConfig, scst

    out = work / f"run-{kind}-scst-{baseline}"
    if not (out / "scst").is_dir():  # a copy that SCST has not started on yet (or a fresh one)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(run, out)
    scst(ScstConfig(run=str(out), epochs=args.scst_epochs, baseline=baseline, device="cpu", seed=args.seed),
         show_progress=False)
    history = [json.loads(line) for line in (out / "scst" / "metrics.jsonl").read_text().splitlines()]
    return out, export(out, work / f"bundle-{kind}-scst-{baseline}", force=True), history


def decode_timing(bundle: Path, images: list[Path], beam: int, reps: int) -> tuple[float, float]:
    """(encoder s, beam decode s) per batch of `images`, ONNX Runtime on the CPU."""
    from capcli.images import load_input
    from capcli.runtime.captioner import decode_states, open_captioner, start_batch

    captioner = open_captioner(bundle, runtime="onnx", provider="cpu")
    batch = np.stack([load_input(p, captioner.preprocessing) for p in images])
    state, context = start_batch(captioner, batch)
    encode = timed(lambda: start_batch(captioner, batch), reps)
    decode = timed(lambda: decode_states(captioner, state, beam, context=context), reps)
    return encode, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=10_000, help="synthetic images")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--decoders", default="pooled,attention")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="images per batch for the decode timing")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dropout", type=float, help="decoder dropout (default: capcli train's)")
    ap.add_argument("--work", help="keep runs and bundles here (default: a temporary folder)")
    ap.add_argument("--scst", default="", help="also fine-tune each run with SCST, one row per baseline "
                    "(e.g. greedy,mean); the training columns of those rows are SCST's")
    ap.add_argument("--scst-epochs", type=int, default=5)
    args = ap.parse_args()

    from capcli.data.readers import load_dataset
    from capcli.data.synthetic import default_synthetic
    from capcli.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("CAPCLI_CACHE", str(work / "cache"))
        data = default_synthetic(n_images=args.images, seed=0)
        ds = load_dataset(str(data), seed=0)
        timing_images = [ds.image_path(n) for n in ds.splits["test"][: args.batch]]
        rows, trained = {}, {}
        runs = [(kind, None) for kind in args.decoders.split(",")]
        runs += [(kind, b) for kind in args.decoders.split(",") for b in args.scst.split(",") if b]
        for kind, baseline in runs:
            t = time.perf_counter()
            if baseline is None:
                run, bundle, history = train_and_export(kind, data, work, args)
                trained[kind] = run
            else:  # SCST samples captions rather than teacher-forcing them: no tokens/s
                run, bundle, history = scst_after(kind, baseline, trained[kind], work, args)
                for h in history:
                    h["tokens_per_s"] = float("nan")
            train_s = time.perf_counter() - t
            report = evaluate(bundle, str(data), split="test", beam_size=args.beam, runtime="onnx",
                              provider="cpu", out=work / f"evaluation-{kind}.json", show_progress=False)
            encode, decode = decode_timing(bundle, timing_images, args.beam, args.reps)
            truth = report["colour_shape_correct"] or {}
            rows[kind if baseline is None else f"{kind}+scst-{baseline}"] = {
                "BLEU-4": report["scores"]["BLEU-4"], "CIDEr-D": report["scores"]["CIDEr-D"],
                "main %": truth.get("main_object", float("nan")), "every %": truth.get("all_named", float("nan")),
                "decode ms/img": decode / args.batch * 1e3, "decode/enc %": 100 * decode / encode,
                "train s/epoch": float(np.median([h["epoch_seconds"] for h in history])),
                "tokens/s": float(np.median([h["tokens_per_s"] for h in history])),
                "epochs": len(history), "total s": train_s,
            }
        print(f"synthetic set of {args.images} images, test split {report['images']} images, ONNX Runtime, "
              f"beam {args.beam}, efficientnet_lite0 (imagenet); decode timed on batches of {args.batch}")
        columns = list(next(iter(rows.values())))
        print(f"{'decoder':24}" + "".join(f"{c:>15}" for c in columns))
        for kind, row in rows.items():
            print(f"{kind:24}" + "".join(f"{v:15.1f}" if isinstance(v, float) else f"{v:15}" for v in row.values()))


if __name__ == "__main__":
    main()
