"""`capcli demo`: the whole pipeline offline on the synthetic set."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    images: Annotated[int, typer.Option(help="Synthetic images to generate.")] = 10_000,
    epochs: Annotated[int, typer.Option(help="Training epochs (early stopping may end sooner).")] = 15,
    out_dir: Annotated[str, typer.Option("--out", help="Bundle folder.")] = "exported/demo",
    run_dir: Annotated[str, typer.Option("--run", help="Run directory.")] = "runs/demo",
) -> None:
    """Offline end to end: synthetic data, efficientnet_lite0 features, train, export, caption, evaluate."""
    from capcli.demo import run_demo

    run_demo(n_images=images, epochs=epochs, bundle=out_dir, run=run_dir)
