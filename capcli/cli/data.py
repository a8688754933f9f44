"""`capcli data ...`: generate the synthetic set, inspect a dataset, download Flickr8k/30k."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from capcli.console import err, out, progress
from capcli.errors import CapcliError

app = typer.Typer(help="Datasets: generate the synthetic set, inspect, download.", no_args_is_help=True)

_LISTED_NAMES = 10  # missing/unreadable images shown in the table; --json lists them all


def _say(text: str) -> None:
    """A plain result line: file names with brackets are not rich markup."""
    out.print(text, markup=False)


# Bounds of `data synth`: a million images is 10-20 GB of JPEGs and hours of drawing; 1024 pixels is far above any
# backbone's input (224-299) and keeps each image's drawing buffers in the tens of MB.
MAX_SYNTH_IMAGES = 1_000_000
MAX_SYNTH_SIZE = 1024


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the dataset into.")],
    images: Annotated[
        int, typer.Option("--images", min=1, max=MAX_SYNTH_IMAGES, help="Number of images.")
    ] = 1500,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Random seed (0 or more): the same seed gives the same files.")
    ] = 0,
    size: Annotated[
        int, typer.Option("--size", min=32, max=MAX_SYNTH_SIZE, help="Image width and height in pixels.")
    ] = 224,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an earlier synthetic set in OUT (only a set this command wrote, with "
                                     "nothing else in its folder)."),
    ] = False,
) -> None:
    """Generate the synthetic coloured-shapes dataset (Kaggle layout + objects.json).

    An existing set in OUT is kept: the same set again is a no-op, another one needs --force.
    """
    from capcli.data.synthetic import CAPTIONS_PER_IMAGE, build

    if _same_set_there(out_dir, images, seed, size, force):
        err.print(f"{out_dir} already holds this set ({images} images, seed {seed}, size {size}); nothing written",
                  markup=False)
        _say(str(out_dir))
        return
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("generating", total=images, info="")
        build(out_dir, images, seed, size, progress=lambda done: bar.update(task, completed=done))
    seconds = time.perf_counter() - started
    err.print(
        f"{images} images, {images * CAPTIONS_PER_IMAGE} captions in {seconds:.1f}s "
        f"({images / seconds:.0f} images/s)"
    )
    _say(str(out_dir))


def _same_set_there(out_dir: Path, images: int, seed: int, size: int, force: bool) -> bool:
    """Whether OUT already holds exactly this set; CapcliError unless OUT is new, empty, or (with --force) an
    earlier synthetic set with nothing else in its folder. A dataset that runs were trained on is never replaced
    by accident: their vocabulary, splits and scores are that set's."""
    from capcli.data.synthetic import foreign_files, synthetic_set
    from capcli.paths import output_folder

    output_folder(out_dir, "OUT")
    link = (f"{out_dir} is a symbolic link (to {os.readlink(out_dir)}): the set would replace the link, not what it "
            "points to; name that folder itself") if out_dir.is_symlink() else None
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        if link:
            raise CapcliError(link)
        return False
    meta = synthetic_set(out_dir)
    if meta is None:
        raise CapcliError(f"{out_dir}: not empty and not a synthetic dataset; choose a new or empty folder")
    foreign = foreign_files(out_dir, meta)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CapcliError(f"{out_dir} holds {shown}, not part of the synthetic set: it is never replaced, not even "
                          "with --force; choose another folder")
    images_there = len(list((out_dir / "Images").iterdir())) if (out_dir / "Images").is_dir() else 0
    complete = (out_dir / "captions.txt").is_file() and images_there == meta.get("n_images")
    if complete and (meta.get("n_images"), meta.get("seed"), meta.get("size")) == (images, seed, size):
        return True
    if link:
        raise CapcliError(link)
    if not force:
        raise CapcliError(f"{out_dir} already holds a synthetic set of {meta.get('n_images')} images (seed "
                          f"{meta.get('seed')}, size {meta.get('size')}); use --force to replace it (runs trained "
                          "on it can then no longer be continued or scored on it), or choose another folder")
    return False


@app.command()
def info(
    dataset: Annotated[
        str,
        typer.Argument(
            metavar="DATASET", help="synthetic, flickr8k, flickr30k, a folder or an annotation file."
        ),
    ],
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Folder holding the images, if not beside the annotations."),
    ] = None,
    threshold: Annotated[int, typer.Option("--threshold", min=1, help="Vocabulary: minimum word count.")] = 5,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the split, for datasets without their own.")
    ] = 0,
    check_images: Annotated[
        bool,
        typer.Option(
            "--check-images/--no-check-images", help="Decode every image (slower) or only look for it."
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show splits, caption and vocabulary statistics, and missing or unreadable images."""
    from capcli.data.info import dataset_info
    from capcli.data.readers import load_dataset

    ds = load_dataset(dataset, images=images, seed=seed)
    with progress(transient=True) as bar:
        task = bar.add_task("checking images", total=len(ds.captions), info="")
        summary = dataset_info(
            ds, threshold, check_images, progress=lambda done: bar.update(task, completed=done)
        )
    if as_json:
        out.print_json(json.dumps(summary))
        return
    _print_info(summary)


def _print_info(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"dataset {summary['name']} ({summary['format']})")
    for column in ("split", "images", "captions"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, counts in summary["splits"].items():
        table.add_row(split, str(counts["images"]), str(counts["captions"]))
    table.add_row("all", str(summary["images"]), str(summary["captions"]), style="bold")
    out.print(table)
    words = summary["caption_words"]
    _say(f"annotation:    {summary['annotation']}")
    _say(f"images in:     {summary['images_dir']}")
    _say(f"fingerprint:   {summary['fingerprint']}")
    _say(f"vocabulary:    {summary['vocab_size']} words (count >= {summary['vocab_threshold']}, train split)")
    _say(f"caption words: min {words['min']}, mean {words['mean']}, p95 {words['p95']:g}, max {words['max']}")
    _print_names("missing images", summary["missing_images"])
    if summary["images"] and len(summary["missing_images"]) == summary["images"]:
        _say(f"hint: no image found in {summary['images_dir']}; pass --images DIR where they are")
    if summary["images_checked"] == "decoded":
        _print_names("unreadable images", summary["unreadable_images"])
    for note in summary["notes"]:
        _say(f"note: {note}")


def _print_names(label: str, names: list[str]) -> None:
    if not names:
        _say(f"{label}: none")
        return
    shown = escape(", ".join(names[:_LISTED_NAMES]))
    more = f" and {len(names) - _LISTED_NAMES} more (--json lists all)" if len(names) > _LISTED_NAMES else ""
    out.print(f"[yellow]{label}: {len(names)}[/yellow] ({shown}{more})", markup=True)


@app.command()
def download(
    name: Annotated[str, typer.Argument(metavar="NAME", help="flickr8k or flickr30k.")],
) -> None:
    """Download a Flickr dataset from Kaggle (needs network; credentials for some datasets)."""
    from capcli.data.download import KAGGLE_DATASETS
    from capcli.data.download import download as fetch

    if name in KAGGLE_DATASETS:
        err.print(f"downloading {name} from Kaggle ({KAGGLE_DATASETS[name]}) ...")
    path = fetch(name)
    _say(str(path))
