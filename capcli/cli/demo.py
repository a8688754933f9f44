"""`capcli demo`: the whole pipeline offline on the synthetic set."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.cli.data import MAX_SYNTH_IMAGES
from capcli.demo import DECODER, EPOCHS, IMAGES


def demo(
    images: Annotated[
        int, typer.Option(min=100, max=MAX_SYNTH_IMAGES, help="Synthetic images to generate.")
    ] = IMAGES,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (early stopping may end sooner).")] = EPOCHS,
    decoder: Annotated[str, typer.Option(help="attention (with heatmaps in the report) or pooled.")] = DECODER,
    out_dir: Annotated[str, typer.Option("--out", help="Bundle folder.")] = "exported/demo",
    run_dir: Annotated[str, typer.Option("--run", help="Run directory.")] = "runs/demo",
) -> None:
    """Offline end to end: synthetic data, efficientnet_lite0 features, train, export, caption, evaluate."""
    from capcli.demo import run_demo

    run_demo(n_images=images, epochs=epochs, bundle=out_dir, run=run_dir, decoder=decoder)
