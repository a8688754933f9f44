"""`capcli evaluate`: caption a split and score it."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.cli.options import (
    AllowUnk,
    BeamSize,
    Constrain,
    Guidance,
    ImagesDir,
    NoRepeatNgram,
    Provider,
    check_constrain,
    guide_options,
)
from capcli.console import json_line
from capcli.tables import print_scores


def evaluate_cmd(
    model: Annotated[str, typer.Argument(help="Bundle folder (onnx) or run directory (torch).")],
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: the one the model was trained on).")] = None,
    images: ImagesDir = None,
    split: Annotated[str, typer.Option(help="Split to caption and score: train, val or test.")] = "test",
    beam_size: BeamSize = 3,
    runtime: Annotated[str, typer.Option(help="onnx or torch.")] = "onnx",
    provider: Provider = "auto",
    device: Annotated[str, typer.Option(help="PyTorch device for --runtime torch.")] = "cpu",
    limit: Annotated[int | None, typer.Option(min=1, help="Caption only the first N images (N >= 1).")] = None,
    allow_missing: Annotated[
        bool,
        typer.Option(help="Score the images that could be read when some of the split's images are missing or "
                          "unreadable (they are listed in the output). Without it that is an error, exit 1."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    out_file: Annotated[
        str | None,
        typer.Option("--out", help="Where to write captions + scores (JSON); default "
                                   "./evaluation-MODEL-SPLIT.json, never inside the bundle."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Let --out replace an existing file that is not a capcli evaluation.")
    ] = False,
    allow_unk: AllowUnk = False,
    no_repeat_ngram: NoRepeatNgram = 3,
    guidance: Guidance = True,
    constrain: Constrain = False,
) -> None:
    """Score generated captions on a dataset split: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (0-100)."""
    from capcli.evaluate import evaluate
    from capcli.runtime.captioner import Guards, open_captioner

    guide = guide_options(guidance, constrain, beam_size > 1)
    if guide.constrain:  # before the split is captioned (the model is opened once more: little next to a split)
        check_constrain(open_captioner(model, runtime=runtime, provider=provider, device=device), model)
    report = evaluate(model, dataset, images, split, beam_size, runtime, provider, device, limit=limit,
                      out=out_file, allow_missing=allow_missing, force=force,
                      guards=Guards(suppress_unk=not allow_unk, no_repeat_ngram=no_repeat_ngram),
                      guidance=guide)
    if as_json:
        json_line({k: v for k, v in report.items() if k != "captions"})
        return
    print_scores(report)
