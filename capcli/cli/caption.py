"""`capcli caption`: images in, captions out."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.console import err, out


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
    attention: Annotated[
        bool, typer.Option("--attention", help="Attention decoder: per-word attention in --json, heatmaps in --html.")
    ] = False,
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
                             n_best=min(beams, beam_size), on_result=show, sampling=sampling, attention=attention)
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
                 "alternatives": [list(a) for a in r.alternatives[1:]],
                 **({"attention": r.attention, "grid": r.grid, "preprocessing": captioner.preprocessing}
                    if r.attention is not None else {})} for r in results]
        out.print(f"report: {write_html(html, rows, title='capcli captions')}")
    if problems or any(r.error for r in results):
        raise typer.Exit(1)
