"""`capcli features` and `capcli train`: the training stage."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.cli.options import BackboneName, DatasetSpec, Device, Engine, ImagesDir, ResizeMode, Split, Weights
from capcli.console import err, out
from capcli.tables import print_training
from capcli.train.config import MAX_FEATURE_BATCH


def features(
    backbone: BackboneName,
    dataset: DatasetSpec = "synthetic",
    images: ImagesDir = None,
    weights: Weights = "imagenet",
    batch_size: Annotated[int, typer.Option(max=MAX_FEATURE_BATCH, help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader workers (default: half the cores on CPU, up to 8 with CUDA).")
    ] = None,
    device: Device = "auto",
    grid: Annotated[bool, typer.Option("--grid", help="Cache the feature grid (attention decoder) instead.")] = False,
    split: Annotated[
        str | None, typer.Option(help="Cache this split point's trunk output instead (what --finetune trains on).")
    ] = None,
    flip: Annotated[
        bool, typer.Option("--flip", help="Of the images mirrored left to right (--flip training).")
    ] = False,
    resize_mode: ResizeMode = "auto",
    engine: Engine = "auto",
) -> None:
    """Extract and cache backbone features for a dataset (resumable; a second run is a no-op)."""
    from capcli.data.readers import load_dataset
    from capcli.errors import CapcliError
    from capcli.features.cache import output_grid, trunk_output
    from capcli.features.extraction import extract
    from capcli.images import resize_mode_for
    from capcli.registry import get_backbone

    if grid and split:
        raise CapcliError("--grid and --split are two different caches: give one")
    spec = get_backbone(backbone)
    ds = load_dataset(dataset, images=images)
    _print_notes(ds)
    spec = spec.with_resize_mode(resize_mode_for(resize_mode, ds)[0])  # the last line names the mode used
    output = trunk_output(spec.split(split).name) if split else "grid" if grid else "pooled"
    cache = extract(spec, ds, weights, batch_size, workers, device, output=output, engine=engine, flip=flip)
    what = f"{output_grid(spec, output)} {output}" if output != "pooled" else f"{spec.feature_dim}-d"
    framed = f" (photos framed by {spec.preprocessing.resize_mode}" + (", mirrored)" if flip else ")")
    done = len(cache.images) - len(cache.failed)
    counted = f"{done} of {len(cache.images)} images" if cache.failed else f"{done} images"
    out.print(f"{counted}, {what} float16 features{framed} in {cache.path}", markup=False)
    if cache.failed:
        err.print(f"{len(cache.failed)} images could not be read and were skipped "
                  f"(they are retried on every run):", markup=False)
        for name, reason in list(cache.failed.items())[:20]:
            err.print(f"  {name}: {reason}", markup=False)


def _print_notes(ds) -> None:
    """What the dataset reader skipped or repaired (a stray quote, malformed lines), one line each."""
    for note in ds.notes:
        err.print(f"note: {note}", markup=False)


def train(
    ctx: typer.Context,
    backbone: Annotated[
        str | None,
        typer.Option("--backbone", help="Backbone plugin name (see capcli backbones); --resume takes the run's."),
    ] = None,
    dataset: DatasetSpec = "synthetic",
    images: ImagesDir = None,
    weights: Weights = "imagenet",
    epochs: Annotated[int, typer.Option(help="Epochs in all (with --resume: may be raised to train longer).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Captions per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    lr_keep_epochs: Annotated[int, typer.Option(help="Epochs at the initial LR before decay.")] = 3,
    lr_decay: Annotated[float, typer.Option(help="LR factor per epoch after that.")] = 0.9,
    patience: Annotated[int, typer.Option(help="Early stop after this many epochs without improvement.")] = 4,
    threshold: Annotated[int, typer.Option(help="Min word count for the vocabulary.")] = 5,
    max_len: Annotated[int, typer.Option(help="Max caption words.")] = 20,
    embed_dim: Annotated[int, typer.Option(help="Word embedding size.")] = 256,
    hidden_dim: Annotated[int, typer.Option(help="LSTM hidden size.")] = 512,
    num_layers: Annotated[int, typer.Option(help="LSTM layers.")] = 1,
    dropout: Annotated[float, typer.Option(help="Dropout probability, in [0, 1).")] = 0.5,
    feature_input: Annotated[
        bool, typer.Option(help="Pooled decoder: also feed the image as the first LSTM input step.")
    ] = False,
    decoder: Annotated[
        str | None,
        typer.Option(help="attention (over the backbone's grid; the default) or pooled (one vector per image); "
                     "--resume keeps the run's."),
    ] = None,
    context_dim: Annotated[int, typer.Option(help="Attention: grid channels after the learned projection.")] = 256,
    attention_dim: Annotated[int, typer.Option(help="Attention: size of the additive attention layer.")] = 256,
    attention_reg: Annotated[
        float, typer.Option(help="Attention: weight of the doubly stochastic regulariser (lambda).")
    ] = 1.0,
    select_on: Annotated[
        str, typer.Option(help="cider (val CIDEr-D of greedy captions) or loss: picks best.pt and stops early.")
    ] = "cider",
    val_sample: Annotated[int, typer.Option(help="Validation images captioned per epoch for the scores.")] = 1000,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing, in [0, 1).")] = 0.1,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 matrix products where the CPU or GPU has them natively), bf16 or fp32.")
    ] = "auto",
    resize_mode: ResizeMode = "auto",
    finetune: Annotated[
        bool, typer.Option("--finetune", help="Train the backbone's tail (after --split) with the attention decoder.")
    ] = False,
    split: Split = None,
    backbone_lr: Annotated[float, typer.Option(help="Adam learning rate of the tuned tail (--finetune).")] = 1e-4,
    flip: Annotated[
        bool, typer.Option("--flip", help="Show about half the training images mirrored each epoch (left/right "
                                          "swapped in their captions; their features are cached once).")
    ] = False,
    out: Annotated[str | None, typer.Option(help="Run directory (default runs/BACKBONE).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out with its own settings (only --epochs, --patience, "
                                "--device, --workers, --engine, --precision may change).")
    ] = False,
    device: Device = "auto",
    seed: int = 0,
    workers: Annotated[int | None, typer.Option(help="Feature-extraction workers.")] = None,
    engine: Engine = "auto",
) -> None:
    """Train the LSTM caption decoder on cached backbone features (extracted first if needed)."""
    from capcli.errors import CapcliError
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train as run_training

    if backbone is None and not resume:
        raise CapcliError("--backbone is required (see capcli backbones)")
    given = tuple(name for name in ctx.params if _given(ctx, name))
    cfg = TrainConfig(
        backbone=backbone or "", dataset=dataset, images=images, weights=weights, out=out, epochs=epochs,
        batch_size=batch_size, lr=lr, lr_keep_epochs=lr_keep_epochs, lr_decay=lr_decay, patience=patience,
        threshold=threshold, max_len=max_len, embed_dim=embed_dim, hidden_dim=hidden_dim,
        num_layers=num_layers, dropout=dropout, feature_input=feature_input, decoder=decoder,
        context_dim=context_dim, attention_dim=attention_dim, attention_reg=attention_reg, resume=resume,
        select_on=select_on, val_sample=val_sample, label_smoothing=label_smoothing, precision=precision,
        resize_mode=resize_mode, finetune=finetune, split=split, backbone_lr=backbone_lr, flip=flip,
        device=device, seed=seed, workers=workers, engine=engine, given=given,
    )
    run_dir = run_training(cfg)
    print_training(run_dir)


def scst(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="A cross-entropy run folder (capcli train --out RUN).")],
    epochs: Annotated[
        int, typer.Option(help="SCST epochs in all (a rerun keeps the run's own unless given: raise it to go on).")
    ] = 10,
    samples: Annotated[int, typer.Option(help="Captions sampled per image.")] = 5,
    baseline: Annotated[
        str, typer.Option(help="greedy (the reward of the model's greedy caption) or mean (of the other samples).")
    ] = "greedy",
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="Images per step (each with --samples captions).")] = 16,
    patience: Annotated[int, typer.Option(help="Early stop after this many epochs without a better val CIDEr-D.")] = 3,
    val_sample: Annotated[int, typer.Option(help="Validation images captioned (greedy) per epoch.")] = 1000,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling (default: the run's).")] = None,
    device: Device = "auto",
    workers: Annotated[int | None, typer.Option(help="Feature-extraction workers.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Where the run's dataset is now, if it moved (default: where the run records "
                                      "it; it must be the same data).")
    ] = None,
    images: ImagesDir = None,
) -> None:
    """Fine-tune a trained run on CIDEr-D with self-critical training; rerun to continue it.

    best.pt becomes SCST's best epoch once it beats the cross-entropy model on val CIDEr-D (greedy
    captions); the cross-entropy best stays in best_xe.pt. `capcli export RUN` exports best.pt.
    """
    from capcli.train.scst import ScstConfig
    from capcli.train.scst import scst as run_scst

    given = tuple(name for name in ctx.params if _given(ctx, name))
    cfg = ScstConfig(run=run, epochs=epochs, samples=samples, baseline=baseline, lr=lr, batch_size=batch_size,
                     patience=patience, val_sample=val_sample, seed=seed, device=device, workers=workers,
                     dataset=dataset, images=images, given=given)
    _print_scst(run_scst(cfg))


def _print_scst(run) -> None:
    import json

    from rich.table import Table

    from capcli.model.checkpoint import load

    path = run / "scst" / "metrics.jsonl"
    history = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    table = Table(title=f"self-critical training {run}")
    for col in ("epoch", "reward", "baseline", "val BLEU-4", "val CIDEr-D", "distinct %", "words", "img/s", ""):
        table.add_column(col, justify="right")
    for h in history:
        table.add_row(str(h["epoch"]), f"{h['train_reward']:.3f}", f"{h['train_baseline']:.3f}",
                      f"{h['val_bleu4']:.1f}", f"{h['val_cider']:.1f}", f"{h['val_distinct']:.0f}",
                      f"{h['val_words']:.1f}", f"{h['images_per_s']:,.1f}", "best" if h.get("best") else "")
    out.print(table)
    best = load(run / "best.pt")
    if best.get("stage") == "scst":
        out.print(f"best.pt is SCST epoch {best['scst']['epoch']} (val CIDEr-D {best['scst']['val_cider']:.1f}); "
                  f"the cross-entropy best is {run / 'best_xe.pt'}", markup=False)
    else:
        out.print("no SCST epoch beat the cross-entropy model on val CIDEr-D: best.pt is still the "
                  "cross-entropy best", markup=False)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option `name` (on the command line or through the environment)."""
    source = ctx.get_parameter_source(name)
    # By name: Typer may ship its own copy of click, with its own ParameterSource enum.
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
