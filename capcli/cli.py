"""The capcli command line: each command is a thin layer over one pipeline module."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from typer.core import TyperGroup

from capcli import __version__
from capcli.console import err, out
from capcli.errors import CapcliError


class _Group(TyperGroup):
    """Turns user errors into one line on stderr and exit 1, and Ctrl-C into exit 130."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CapcliError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted; finished work is kept: rerun the same command to resume "
                      "(for train, add --resume)")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="Train CNN+LSTM image-captioning models, export them to ONNX, caption with ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"capcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Train CNN+LSTM image-captioning models, export them to ONNX, caption with ONNX Runtime."""


@app.command()
def backbones(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the installed backbone plugins."""
    from capcli.registry import plugins

    found = plugins()
    rows = []
    for p in found:
        b = p.backbone
        rows.append(
            {
                "name": p.name,
                "feature_dim": b.feature_dim if b else None,
                "input_size": b.input_size if b else None,
                "weights": b.weights_source if b else None,
                "distribution": p.distribution,
                "version": p.version,
                **({"error": p.error} if p.error else {}),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.table import Table

    table = Table(title="capcli backbones")
    for col in ("name", "feature dim", "input", "weights", "distribution", "version"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], "[red]failed to load[/red]", "", r["error"], r["distribution"], r["version"])
        else:
            table.add_row(
                r["name"], str(r["feature_dim"]), str(r["input_size"]), r["weights"],
                r["distribution"], r["version"],
            )
    if not rows:
        err.print("no backbone plugins installed (or CAPCLI_PLUGINS excludes them all)")
    out.print(table)


Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
BackboneName = Annotated[str, typer.Option("--backbone", help="Backbone plugin name (see capcli backbones).")]
DatasetSpec = Annotated[str, typer.Option("--dataset", help="synthetic, flickr8k, flickr30k or a path.")]
ImagesDir = Annotated[str | None, typer.Option("--images", help="Image folder, when apart from the annotations.")]
Weights = Annotated[str, typer.Option(help="'imagenet' (download), 'none' (random) or a state-dict path.")]


@app.command()
def features(
    backbone: BackboneName,
    dataset: DatasetSpec = "synthetic",
    images: ImagesDir = None,
    weights: Weights = "imagenet",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[
        int | None, typer.Option(min=0, help="DataLoader workers (default: half the cores on CPU, up to 8 with CUDA).")
    ] = None,
    device: Device = "auto",
) -> None:
    """Extract and cache backbone features for a dataset (resumable; a second run is a no-op)."""
    from capcli.data.readers import load_dataset
    from capcli.features import extract
    from capcli.registry import get_backbone

    spec = get_backbone(backbone)
    ds = load_dataset(dataset, images=images)
    cache = extract(spec, ds, weights, batch_size, workers, device)
    out.print(f"{len(cache.images)} images, {spec.feature_dim}-d float16 features in {cache.path}")
    if cache.failed:
        err.print(f"{len(cache.failed)} images could not be read and were skipped:")
        for name, reason in list(cache.failed.items())[:20]:
            err.print(f"  {name}: {reason}")


@app.command()
def train(
    backbone: BackboneName,
    dataset: DatasetSpec = "synthetic",
    images: ImagesDir = None,
    weights: Weights = "imagenet",
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    lr_keep_epochs: Annotated[int, typer.Option(help="Epochs at the initial LR before decay.")] = 3,
    lr_decay: Annotated[float, typer.Option(help="LR factor per epoch after that.")] = 0.9,
    patience: Annotated[int, typer.Option(help="Early stop after this many epochs without improvement.")] = 3,
    threshold: Annotated[int, typer.Option(help="Min word count for the vocabulary.")] = 5,
    max_len: Annotated[int, typer.Option(help="Max caption words.")] = 20,
    embed_dim: int = 256,
    hidden_dim: int = 512,
    num_layers: int = 1,
    dropout: float = 0.3,
    feature_input: Annotated[bool, typer.Option(help="Also feed the image as the first LSTM input step.")] = False,
    out: Annotated[str | None, typer.Option(help="Run directory (default runs/BACKBONE).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    device: Device = "auto",
    seed: int = 0,
    workers: Annotated[int | None, typer.Option(help="Feature-extraction workers.")] = None,
) -> None:
    """Train the LSTM caption decoder on cached backbone features (extracted first if needed)."""
    from capcli.train import TrainConfig
    from capcli.train import train as run_training

    cfg = TrainConfig(
        backbone=backbone, dataset=dataset, images=images, weights=weights, out=out, epochs=epochs,
        batch_size=batch_size, lr=lr, lr_keep_epochs=lr_keep_epochs, lr_decay=lr_decay, patience=patience,
        threshold=threshold, max_len=max_len, embed_dim=embed_dim, hidden_dim=hidden_dim,
        num_layers=num_layers, dropout=dropout, feature_input=feature_input, resume=resume, device=device,
        seed=seed, workers=workers,
    )
    run_dir = run_training(cfg)
    out_console_summary(run_dir)


def out_console_summary(run_dir) -> None:
    import json

    from rich.table import Table

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    table = Table(title=f"training {run_dir}")
    for col in ("epoch", "train loss", "val loss", "val BLEU-4", "val CIDEr-D", "tokens/s", "lr", ""):
        table.add_column(col, justify="right")
    for h in history:
        table.add_row(str(h["epoch"]), f"{h['train_loss']:.3f}", f"{h['val_loss']:.3f}", f"{h['val_bleu4']:.1f}",
                      f"{h['val_cider']:.1f}", f"{h['tokens_per_s']:,.0f}", f"{h['lr']:.1e}",
                      "best" if h.get("best") else "")
    out.print(table)
    best = min(history, key=lambda h: h["val_loss"])
    out.print(f"best epoch {best['epoch']} (val loss {best['val_loss']:.3f}): its weights are {run_dir / 'best.pt'}")


@app.command("export")
def export_cmd(
    run: Annotated[str, typer.Argument(help="Run directory or checkpoint file.")],
    out_dir: Annotated[str | None, typer.Option("--out", help="Bundle folder (default exported/RUN).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    images: Annotated[list[str] | None, typer.Option("--images", help="Images for the parity check.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Export a run to an ONNX bundle (encoder + one-step decoder), checked against PyTorch."""
    import json
    from pathlib import Path

    from capcli.export import export

    bundle_dir = export(run, out_dir, opset, [Path(p) for p in images] if images else None, force)
    parity = json.loads((bundle_dir / "capcli.json").read_text())["parity"]
    out.print(
        f"bundle {bundle_dir}: parity encoder {parity['encoder_max_abs_diff']:.1e}, "
        f"step {parity['step_log_probs_max_abs_diff']:.1e}, greedy captions equal: {parity['greedy_captions_equal']}"
    )


@app.command()
def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    model: Annotated[str, typer.Option(help="Bundle folder (onnx) or run dir / bundle (torch).")] = "exported/demo",
    runtime: Annotated[str, typer.Option(help="onnx or torch.")] = "onnx",
    beam_size: Annotated[int, typer.Option(min=1, help="1 = greedy.")] = 3,
    beams: Annotated[int, typer.Option(min=1, help="Alternatives to show per image (with beam search).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    provider: Annotated[str, typer.Option(help="ONNX Runtime provider: auto, cpu or cuda.")] = "auto",
    device: Annotated[str, typer.Option(help="PyTorch device for --runtime torch.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    html: Annotated[str | None, typer.Option(help="Also write an HTML report here.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample words instead of beam search.")] = False,
    temperature: Annotated[float, typer.Option(min=1e-3, help="Softmax temperature for --sample.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest words (0 = all).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed for --sample.")] = 0,
) -> None:
    """Caption images with an exported bundle (ONNX Runtime) or a run (PyTorch)."""
    import json

    from capcli.caption import Sampling, caption_images, open_captioner
    from capcli.images import expand_image_args

    paths, problems = expand_image_args(images)
    for p in problems:
        err.print(f"[red]error:[/red] {p}", markup=True)
    captioner = open_captioner(model, runtime=runtime, provider=provider, device=device)

    def show(r) -> None:
        if r.error:
            err.print(f"[red]error:[/red] {r.error}", markup=True)
        elif as_json:
            out.print(json.dumps(r.to_dict()), markup=False)

    sampling = Sampling(temperature, top_k, seed) if sample else None
    results = caption_images(captioner, paths, beam_size=beam_size, batch_size=batch_size,
                             n_best=min(beams, beam_size), on_result=show, sampling=sampling)
    if not as_json:
        from rich.table import Table

        how = "sampled" if sample else "greedy" if beam_size == 1 else f"beam {beam_size}"
        table = Table(title=f"captions ({captioner.runtime}, {how})")
        table.add_column("image", overflow="fold")
        table.add_column("caption", overflow="fold")
        table.add_column("score", justify="right")
        for r in results:
            if r.error is None:
                extra = "".join(f"\n  [dim]{c} ({s:.2f})[/dim]" for c, s in r.alternatives[1:])
                table.add_row(r.image, r.caption + extra, f"{r.score:.3f}")
        out.print(table)
    if html:
        from capcli.report import write_html

        rows = [{"image": r.image, "caption": r.caption or "", "score": r.score, "error": r.error,
                 "alternatives": [list(a) for a in r.alternatives[1:]]} for r in results]
        out.print(f"report: {write_html(html, rows, title='capcli captions')}")
    if problems or any(r.error for r in results):
        raise typer.Exit(1)


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Argument(help="Bundle folder (onnx) or run directory (torch).")],
    dataset: Annotated[str | None, typer.Option(help="Dataset (default: the one the model was trained on).")] = None,
    images: ImagesDir = None,
    split: str = "test",
    beam_size: Annotated[int, typer.Option(min=1)] = 3,
    runtime: Annotated[str, typer.Option(help="onnx or torch.")] = "onnx",
    provider: str = "auto",
    device: str = "cpu",
    limit: Annotated[int | None, typer.Option(help="Caption only the first N images.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    out_file: Annotated[str | None, typer.Option("--out", help="Where to write captions + scores (JSON).")] = None,
) -> None:
    """Score generated captions on a dataset split: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (0-100)."""
    import json

    from capcli.evaluate import evaluate

    report = evaluate(model, dataset, images, split, beam_size, runtime, provider, device, limit=limit,
                      out=out_file)
    if as_json:
        out.print(json.dumps({k: v for k, v in report.items() if k != "captions"}), markup=False)
        return
    print_scores(report)


def print_scores(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{report['dataset']} {report['split']} · {report['images']} images · "
                        f"beam {report['beam_size']} · {report['runtime']} · tokenizer {report['tokenizer']}")
    table.add_column("metric")
    table.add_column("score (0-100)", justify="right")
    for name, value in report["scores"].items():
        table.add_row(name, f"{value:.1f}")
    truth = report.get("colour_shape_correct")
    if truth is not None:
        table.add_row("main object colour+shape right %", f"{truth['main_object']:.1f}")
        table.add_row("every named object right %", f"{truth['all_named']:.1f}")
    out.print(table)
    for s in report.get("skipped", []):
        err.print(f"skipped: {s}")
    out.print(f"captions and scores written to {report['out']}")


@app.command()
def demo(
    images: Annotated[int, typer.Option(help="Synthetic images to generate.")] = 10_000,
    epochs: Annotated[int, typer.Option(help="Training epochs (early stopping may end sooner).")] = 15,
    out_dir: Annotated[str, typer.Option("--out", help="Bundle folder.")] = "exported/demo",
    run_dir: Annotated[str, typer.Option("--run", help="Run directory.")] = "runs/demo",
) -> None:
    """Offline end to end: synthetic data, efficientnet_lite0 features, train, export, caption, evaluate."""
    from capcli.demo import run_demo

    run_demo(n_images=images, epochs=epochs, bundle=out_dir, run=run_dir)


def _add_data_commands() -> None:
    from capcli.cli_data import app as data_app

    app.add_typer(data_app, name="data")


_add_data_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
