"""`capcli caption`: images in, captions out."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from capcli.cli.options import (
    MAX_BEAM,
    MAX_DECODE_BATCH,
    AllowUnk,
    BeamSize,
    Constrain,
    Guidance,
    NoRepeatNgram,
    Provider,
    check_constrain,
    guide_options,
)
from capcli.console import err, error, json_line, out, plain, shown, warn


def _temperature(value: float) -> float:
    """Checked here rather than by a range: a range lets NaN through or names it wrongly."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    if not 1e-3 <= value <= 100:
        raise typer.BadParameter(f"must be from 0.001 to 100, got {value:g}")
    return value


def finite_json(value):
    """`value` with every non-finite float as null: JSON has no NaN or Infinity, and a parser would reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    model: Annotated[
        str | None,
        typer.Option(help="Bundle folder (onnx) or run dir / bundle (torch); default: the shipped Flickr8k model."),
    ] = None,
    runtime: Annotated[str, typer.Option(help="onnx or torch.")] = "onnx",
    beam_size: BeamSize = 3,
    beams: Annotated[
        int, typer.Option(min=1, max=MAX_BEAM,
                          help="Alternatives to show per image (beam search only; at most --beam-size).")
    ] = 1,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_DECODE_BATCH, help="Images decoded together (encoded 16 at a time).")
    ] = 8,
    provider: Provider = "auto",
    device: Annotated[str, typer.Option(help="PyTorch device for --runtime torch.")] = "cpu",
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines on stdout, one per image (failed ones with an 'error').")
    ] = False,
    html: Annotated[str | None, typer.Option(help="Also write an HTML report here.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample words instead of beam search.")] = False,
    temperature: Annotated[
        float, typer.Option(callback=_temperature, help="Softmax temperature for --sample (0.001 to 100).")
    ] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest words (0 = all).")] = 0,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Random seed for --sample.")] = 0,
    attention: Annotated[
        bool, typer.Option("--attention", help="Attention decoder: per-word attention in --json, heatmaps in --html.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Let --html replace an existing file that is not a capcli report.")
    ] = False,
    allow_unk: AllowUnk = False,
    no_repeat_ngram: NoRepeatNgram = 3,
    guidance: Guidance = True,
    constrain: Constrain = False,
) -> None:
    """Caption images with an exported bundle (ONNX Runtime) or a run (PyTorch).

    Exits 1 when any image could not be captioned (each is named on stderr; the others are captioned).
    """
    from capcli.runtime.captioner import (
        Guards,
        Sampling,
        caption_images,
        find_images,
        open_captioner,
    )

    _check_beams(beams, beam_size, sample)
    if runtime not in ("onnx", "torch"):  # a bad option is named before anything is looked up
        from capcli.errors import CapcliError

        raise CapcliError(f"unknown runtime '{runtime}'; use onnx or torch")
    model = model or shipped_model()
    paths, problems = find_images(images)
    if html is not None:
        _check_html(html, [*paths, model], force)  # before any captioning
    for p in problems:
        error(p)
    guide = guide_options(guidance, constrain, beam_size > 1 and not sample)
    captioner = open_captioner(model, runtime=runtime, provider=provider, device=device)
    if guide.constrain:
        check_constrain(captioner, model)

    def show(r) -> None:
        if r.error:
            error(r.error)
        if as_json:
            json_line(finite_json(r.to_dict()))

    sampling = Sampling(temperature, top_k, seed) if sample else None
    results = caption_images(captioner, paths, beam_size=beam_size, batch_size=batch_size, n_best=beams,
                             on_result=show, sampling=sampling, attention=attention,
                             guards=Guards(suppress_unk=not allow_unk, no_repeat_ngram=no_repeat_ngram),
                             guidance=guide)
    if not as_json:
        _print_table(results, captioner.runtime, "sampled" if sample else "greedy" if beam_size == 1 else
                     f"beam {beam_size}")
    if html:
        from capcli.report import write_html

        rows = [{"image": r.image, "caption": r.caption or "", "score": r.score, "error": r.error,
                 "alternatives": [list(a) for a in r.alternatives[1:]],
                 **({"classes": r.classes.to_json()} if r.classes is not None else {}),
                 **({"attention": r.attention, "grid": r.grid, "preprocessing": captioner.preprocessing}
                    if r.attention is not None else {})} for r in results]
        err.print(f"report: {shown(write_html(html, rows, title='capcli captions'))}")
    if problems or any(r.error for r in results):
        raise typer.Exit(1)


def shipped_model() -> str:
    """The shipped bundle, for a command given no model: named on stderr, and a broken ./exported/flickr8k passed
    over is said (it would otherwise answer as another model, silently)."""
    from pathlib import Path

    from capcli.runtime.captioner import SHIPPED_MODEL, default_model

    here = Path("exported") / SHIPPED_MODEL
    model = default_model()
    if model != here and (here.exists() or here.is_symlink()):
        warn(f"{here} has no capcli.json (not a bundle, or a broken one): using {model.resolve()} instead")
    err.print(f"model: {model.resolve()} (the shipped Flickr8k bundle; --model picks another)", markup=False,
              highlight=False)
    return str(model)


def _check_html(html: str, inputs: list[str], force: bool) -> None:
    from capcli.paths import protected_output
    from capcli.report import is_report

    protected_output(html, "--html", inputs=inputs, force=force, ours=is_report)


def _check_beams(beams: int, beam_size: int, sample: bool) -> None:
    if beams == 1:
        return
    if sample:
        raise typer.BadParameter("--beams needs beam search; --sample gives one caption per image",
                                 param_hint="'--beams'")
    if beam_size == 1:
        raise typer.BadParameter("--beams needs beam search; --beam-size 1 is greedy decoding",
                                 param_hint="'--beams'")
    if beams > beam_size:
        raise typer.BadParameter(f"{beams} alternatives asked for, but beam search keeps --beam-size {beam_size}",
                                 param_hint="'--beams'")


def _print_table(results, runtime: str, how: str) -> None:
    from rich.table import Table
    from rich.text import Text

    if all(r.error is not None for r in results):
        return  # every image failed, each already named on stderr: an empty table would only add noise
    table = Table(title=f"captions ({runtime}, {how})")
    table.add_column("image", overflow="fold")
    table.add_column("caption", overflow="fold")
    table.add_column("score", justify="right")
    for r in results:
        if r.error is None:
            caption = plain(r.caption)
            for c, s in r.alternatives[1:]:
                caption.append(Text.assemble("\n  ", plain(f"{c} ({s:.2f})", "dim")))
            table.add_row(plain(r.image), caption, f"{r.score:.3f}")
    out.print(table)
