"""The offline demo: the whole pipeline on the embedded synthetic dataset, in a few minutes on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text

from capcli.console import err, out, plain
from capcli.runtime.captioner import Guards

BACKBONE = "efficientnet_lite0"  # its ImageNet weights ship in a pip package: works offline
# The attention decoder is right more often than the pooled one on every checkable figure
# (benchmarks/bench_decoders.py), and its report shows where it looked for each word.
DECODER = "attention"
# Sized for a few minutes on a 2-core CPU: the attention decoder's captions beat the pooled decoder's after
# 15 epochs on 10,000 images already with 3 epochs on 5,000, a quarter of its attention size and half its
# context size. The per-word attention, whose cost scales with the attention size, is most of an epoch's
# time on a CPU; three epochs reach four's BLEU-4, CIDEr-D and main-object figures when the learning rate
# is higher and drops for the last epoch.
IMAGES = 5_000
EPOCHS = 3
LR = 1.5e-3
LAST_EPOCH_LR = 0.3  # x LR for the last epoch


def _step(title: str) -> float:
    err.rule(Text(title, style="bold"))
    return time.perf_counter()


def earlier_run(run: Path, decoder: str) -> bool:
    """Whether `run` holds an earlier demo run to resume; CapcliError if it is one of another decoder kind."""
    import json

    from capcli.errors import CapcliError

    if not (run / "last.pt").is_file():
        return False
    try:
        kind = json.loads((run / "config.json").read_text())["train"].get("decoder") or "pooled"
    except (OSError, ValueError, KeyError, AttributeError):
        kind = decoder  # the resume itself names what is wrong with the run
    if kind != decoder:
        raise CapcliError(f"{run} holds an earlier demo run of the {kind} decoder; this demo trains the {decoder} "
                          f"decoder: pass --run with another folder, --decoder {kind}, or remove {run}")
    return True


def check_demo_bundle(bundle: Path, run: Path) -> None:
    """The demo exports with --force into `bundle`: refused unless that is new, empty, or the demo's own earlier
    bundle (made from `run`), so that `--out exported/flickr8k` or a folder of yours is never replaced."""
    import json

    from capcli.errors import CapcliError
    from capcli.paths import BUNDLE_MANIFEST, is_bundle_folder, output_folder

    output_folder(bundle)
    if not bundle.exists() or (bundle.is_dir() and not any(bundle.iterdir())):
        return
    if not is_bundle_folder(bundle):
        raise CapcliError(f"--out '{bundle}' exists and is not a bundle; the demo writes its bundle into a new folder "
                          "or over its own earlier one: pass another --out")
    try:
        source = json.loads((bundle / BUNDLE_MANIFEST).read_text(encoding="utf-8")).get("source_checkpoint")
    except (OSError, ValueError, AttributeError):
        source = None
    if not isinstance(source, str) or Path(source) != (run / "best.pt").resolve():
        made_from = source if isinstance(source, str) else "another run"
        raise CapcliError(f"--out '{bundle}' holds a bundle that is not this demo's (made from {made_from}); the demo "
                          "replaces only its own: pass another --out")


# Synthetic captions repeat 3-grams by design ("a small blue square and a small blue circle"), and the demo's
# vocabulary holds every word: the repetition block meant for real photos would only break right captions.
SYNTHETIC_GUARDS = Guards(suppress_unk=True, no_repeat_ngram=0)


def run_demo(n_images: int = IMAGES, epochs: int = EPOCHS, bundle: str = "exported/demo", run: str = "runs/demo",
             show: int = 6, decoder: str = DECODER) -> dict:
    from rich.table import Table

    from capcli.bundle.build import export
    from capcli.data.readers import load_dataset
    from capcli.data.synthetic import default_synthetic
    from capcli.evaluate import evaluate
    from capcli.features.extraction import extract
    from capcli.model import decoders
    from capcli.registry import get_backbone
    from capcli.report import write_html
    from capcli.runtime.captioner import caption_images, open_captioner
    from capcli.tables import print_scores
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    decoders.check_kind(decoder)
    check_demo_bundle(Path(bundle), Path(run))  # before any work: the demo replaces only its own bundle
    timings, started = {}, time.perf_counter()
    t = _step("1/5 synthetic dataset")
    data_dir = default_synthetic(n_images=n_images, seed=0)
    ds = load_dataset(str(data_dir), seed=0)
    out.print(f"{len(ds.images)} images in {data_dir} ({', '.join(f'{k} {len(v)}' for k, v in ds.splits.items())})")
    timings["data_s"] = time.perf_counter() - t

    t = _step(f"2/5 {BACKBONE} features")
    spec = get_backbone(BACKBONE)
    output = decoders.feature_output(decoder)
    extract(spec, ds, "imagenet", batch_size=32, engine="auto", output=output)  # ONNX Runtime on a CPU
    timings["features_s"] = time.perf_counter() - t

    t = _step(f"3/5 train the LSTM decoder ({decoder})")
    run_path = Path(run)
    resume = earlier_run(run_path, decoder)
    if resume:
        err.print(f"{run} holds an earlier demo run: resuming it (a finished run is kept as it is)")
    # A demo run of an earlier capcli version resumes with its own settings, but for how long it trains
    cfg = TrainConfig(backbone=BACKBONE, dataset=str(data_dir), weights="imagenet", out=run, epochs=epochs,
                      batch_size=64, hidden_dim=256, embed_dim=128, context_dim=128, attention_dim=64,
                      dropout=0.3, label_smoothing=0.0, select_on="loss", precision="fp32",
                      lr=LR, lr_keep_epochs=max(1, epochs - 1), lr_decay=LAST_EPOCH_LR,
                      resume=resume, patience=3, decoder=decoder, given=("epochs", "patience"))
    train(cfg)
    timings["train_s"] = time.perf_counter() - t

    t = _step("4/5 export to ONNX")
    export(run, bundle, force=True)
    out.print(f"bundle written to {bundle}")
    timings["export_s"] = time.perf_counter() - t

    t = _step("5/5 caption and evaluate with ONNX Runtime (beam 3)")
    captioner = open_captioner(bundle, runtime="onnx", provider="cpu")
    names = ds.splits["test"][:show]
    with_attention = captioner.grid is not None  # the report draws its word-by-word heatmaps
    results = caption_images(captioner, [ds.image_path(n) for n in names], beam_size=3, attention=with_attention,
                             guards=SYNTHETIC_GUARDS)
    table = Table(title="test images, ONNX Runtime, beam 3")
    for col in ("image", "generated", "a reference"):
        table.add_column(col)
    for name, r in zip(names, results, strict=True):
        table.add_row(name, r.caption or plain(r.error, "red"), ds.captions[name][0])
    out.print(table)
    # METEOR is left out: its java scorer takes longer than captioning the whole split (capcli evaluate has it).
    report = evaluate(bundle, str(data_dir), split="test", beam_size=3, runtime="onnx", provider="cpu",
                      out=Path(run) / "evaluation-test.json", meteor=False, guards=SYNTHETIC_GUARDS)
    print_scores(report)
    rows = [{"image": str(ds.image_path(c["image"])), "caption": c["caption"], "references": c["references"]}
            for c in report["captions"][:48]]
    maps = {r.image: r for r in results if r.attention is not None}
    for row in rows:
        if row["image"] in maps:  # the same beam-3 caption, with the attention it was predicted with
            r = maps[row["image"]]
            row.update(caption=r.caption, attention=r.attention, grid=r.grid, preprocessing=captioner.preprocessing)
    truth = report["colour_shape_correct"] or {}
    note = (f"{report['images']} test images, ONNX Runtime, beam 3, tokenizer {report['tokenizer']}. "
            f"Main object colour+shape right: {truth.get('main_object', float('nan')):.1f}%; "
            f"every named object right: {truth.get('all_named', float('nan')):.1f}%.")
    html = write_html(Path(run) / "report.html", rows, title="capcli demo: synthetic test split",
                      scores=report["scores"], note=note)
    timings["caption_eval_s"] = time.perf_counter() - t
    out.print(f"HTML report: {html}")
    timings["total_s"] = time.perf_counter() - started
    out.print("timings: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items()))
    return {"report": report, "timings": timings}
