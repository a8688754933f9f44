"""Property: however an output path is spelled, a command never writes over its inputs or a bundle's or a
training run's files.

For each command that writes files (caption --html, evaluate --out, export --out, data synth OUT), hypothesis
draws a protected target (an input: the captioned photo, the dataset's captions file, its ground truth
objects.json, an image it captions, any image of the dataset; every file of the bundle; every file of the run as
self-critical training leaves it, scst/ included; the bundle or run folder itself, and the run's scst/ folder) and
a spelling of it: absolute, relative, with ./, through a symlink to the file or to its folder, with /./, // or
DIR/../DIR segments, with a trailing slash, with or without --force. Every one must be refused: exit 1, one
error line, and every file of the bundle, the run, the dataset and the captioned image byte-identical after.

The one allowed write: with --force, a symlink the user made (to a bundle or run file) is replaced by the
report itself; the file it points to is untouched.

A spelling through a folder that does not exist yet (DIR/missing/../NAME) is checked apart, below: it names nothing
now and DIR/NAME once the command has made `missing`, so it is refused
(`test_a_dotdot_after_a_missing_folder_is_refused`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_reliability_outputs import env, invoke, one_line_error, snapshot  # noqa: F401 (env: the fixture)

BUNDLE_FILES = ("capcli.json", "encoder.onnx", "decoder.onnx", "vocab.json")
RUN_FILES = ("best.pt", "last.pt", "config.json", "vocab.json", "best_xe.pt", "metrics.jsonl", "metrics.csv",
             "curves.png", "scst/last.pt", "scst/metrics.jsonl", "scst/metrics.csv")  # a run after capcli scst


@dataclass(frozen=True)
class World:
    base: Path  # the folder holding the run and the bundle: the working directory of every command here
    run: Path
    bundle: Path
    data: Path  # a copy of the small synthetic set (evaluate's dataset): the session's own is never a target
    photo: Path  # the image `caption` captions
    links: Path  # symlinks made by the spellings


@pytest.fixture(scope="module")
def world(env, tmp_path_factory) -> World:  # noqa: F811 (env: imported above as a fixture)
    """The tiny run and bundle of test_reliability_outputs, the run completed as training and then self-critical
    training leave one."""
    run, bundle = env["run"], env["bundle"]
    (run / "scst").mkdir()
    for name in ("last.pt", "best_xe.pt", "scst/last.pt"):
        shutil.copy(run / "best.pt", run / name)
    for name in ("metrics.jsonl", "scst/metrics.jsonl"):
        (run / name).write_text('{"epoch": 1}\n')
    for name in ("metrics.csv", "scst/metrics.csv"):
        (run / name).write_text("epoch\n1\n")
    (run / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    vocab = json.loads((bundle / "vocab.json").read_text())
    (run / "vocab.json").write_text(json.dumps(vocab, indent=1))  # not the bytes an export would write
    mine = tmp_path_factory.mktemp("spellings")
    data = Path(shutil.copytree(env["data"], mine / "data"))
    photo = Path(shutil.copy(next((data / "Images").iterdir()), mine / "photo.jpg"))
    (mine / "links").mkdir()
    return World(base=run.parent, run=run, bundle=bundle, data=data, photo=photo, links=mine / "links")


@pytest.fixture(scope="module", autouse=True)
def quick_scores():
    """Scores without java (no PTB tokenizer, no METEOR: 50 s a run here), as test_evaluate_demo's: the few
    evaluations that do run here are about where their report goes."""
    import capcli.metrics

    real = capcli.metrics.score_captions

    def quick(references, candidates, **_options):  # evaluate passes meteor=None: java's when present
        return real(references, candidates, meteor=False, tokenizer="simple")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(capcli.metrics, "score_captions", quick)
        yield


def protected(world: World) -> dict[str, bytes]:
    return {"photo": world.photo.read_bytes(),
            **{f"{name}/{path}": data for name in ("run", "bundle", "data")
               for path, data in snapshot(getattr(world, name)).items()}}


@dataclass(frozen=True)
class Spelling:
    form: str  # absolute, relative, ./relative
    via: str  # the real folder, a symlink to the folder, a symlink to the target itself
    join: str  # "/", "/./", "//", or "/../NAME/": up from the folder and back into it
    trailing_slash: bool

    def write(self, target: Path, world: World) -> str:
        if self.via == "file link":
            anchor, name, physical = _link(world.links / f"to-{target.name}", target), "", world.links
        elif self.via == "folder link":
            anchor, name, physical = _link(world.links / f"in-{target.parent.name}", target.parent), target.name, \
                target.parent
        else:
            anchor, name, physical = target.parent, target.name, target.parent
        if self.form == "absolute":
            text = str(anchor)
        else:
            text = os.path.relpath(anchor, world.base)
            text = f"./{text}" if self.form == "./relative" else text
        if name:
            join = f"/../{physical.name}/" if self.join == "up and back" else self.join
            text = f"{text}{join}{name}"
        return text + ("/" if self.trailing_slash else "")


def _link(link: Path, target: Path) -> Path:
    """A fresh symlink (an earlier example with --force may have replaced it by a report)."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
    return link


spellings = st.builds(Spelling, form=st.sampled_from(["absolute", "relative", "./relative"]),
                      via=st.sampled_from(["folder", "folder link", "file link"]),
                      join=st.sampled_from(["/", "/./", "//", "up and back"]), trailing_slash=st.booleans())


def check_refused(world: World, args: list, out: str, force: bool, link_may_be_replaced: bool) -> None:
    """`args` run in world.base: every protected file as it was, and (but for a replaced link) one error line."""
    before = protected(world)
    with contextlib.chdir(world.base):
        result = invoke(*args, *(["--force"] if force else []))
        link = Path(out.rstrip("/"))
        replaced_link = link_may_be_replaced and result.exit_code == 0 and not link.is_symlink() and link.is_file()
    after = protected(world)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"{' '.join(map(str, args))}{' --force' if force else ''} (exit {result.exit_code}) " \
        f"changed {changed}"
    if not replaced_link:
        one_line_error(result)


# --- the property, command by command ------------------------------------------------------------------------


def target(world: World, name: str) -> Path:
    """A target by its name here: 'run', 'bundle', 'data', 'photo', 'run/FILE', 'bundle/FILE' or 'data/FILE'."""
    folder, _, rest = name.partition("/")
    if folder == "data" and rest.startswith("Images/"):  # an image of a split, by the split's name
        from capcli.data.readers import load_dataset

        rest = "Images/" + load_dataset(str(world.data)).splits[rest.removeprefix("Images/")][0]
    return getattr(world, folder) / rest if rest else getattr(world, folder)


FILE_TARGETS = [*(f"bundle/{n}" for n in BUNDLE_FILES), *(f"run/{n}" for n in RUN_FILES)]
# Each target is its own property (hypothesis drawing the spelling and --force), so every one is tried however
# the draws fall.
EACH = settings(max_examples=6, deadline=None)


@pytest.mark.parametrize("name", ["photo", *FILE_TARGETS])
@EACH
@given(spelling=spellings, force=st.booleans())
def test_caption_html_never_writes_over_protected_files(world, name, spelling, force):
    out = spelling.write(target(world, name), world)
    check_refused(world, ["caption", world.photo, "--model", world.bundle, "--html", out], out, force,
                  link_may_be_replaced=force and spelling.via == "file link" and name != "photo")


# What evaluate reads: the captions file, the ground truth, an image it captions (the first of the test split,
# with --limit 2); and an image of the dataset it does not read, whose link may be replaced with --force.
EVALUATE_READS = ["data/captions.txt", "data/objects.json", "data/Images/test"]


@pytest.mark.parametrize("name", [*EVALUATE_READS, "data/Images/train", *FILE_TARGETS])
@EACH
@given(spelling=spellings, force=st.booleans())
def test_evaluate_out_never_writes_over_protected_files(world, name, spelling, force):
    out = spelling.write(target(world, name), world)
    check_refused(world, ["evaluate", world.bundle, "--dataset", world.data, "--limit", "2", "--out", out], out,
                  force, link_may_be_replaced=force and spelling.via == "file link" and name not in EVALUATE_READS)


@pytest.mark.parametrize("name", ["run", "run/scst", "bundle", "photo", *FILE_TARGETS])
@EACH
@given(spelling=spellings, force=st.booleans())
def test_export_out_never_writes_over_protected_files(world, name, spelling, force):
    """The run's folder, its scst/ folder and their files, the bundle's files, the parity image it reads
    (--images); the bundle folder itself only without --force (with it, replacing that bundle is what --force is
    for)."""
    assume(not (name == "bundle" and force))
    out = spelling.write(target(world, name), world)
    check_refused(world, ["export", world.run, "--exporter", "torchscript", "--images", world.photo, "--images",
                          world.photo, "--out", out], out, force, link_may_be_replaced=False)


@pytest.mark.parametrize("name", ["run", "run/scst", "bundle", "data", *FILE_TARGETS])
@EACH
@given(spelling=spellings, force=st.booleans())
def test_data_synth_never_writes_over_protected_files(world, name, spelling, force):
    """The run, its scst/ folder, the bundle and their files; the dataset itself only without --force (with it,
    replacing a synthetic set is what --force is for)."""
    assume(not (name == "data" and force))
    out = spelling.write(target(world, name), world)
    check_refused(world, ["data", "synth", "--images", "2", "--size", "48", out], out, force,
                  link_may_be_replaced=False)


# --- DIR/missing/../NAME --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["caption", "evaluate", "export", "data synth"])
def test_a_dotdot_after_a_missing_folder_is_refused(world, tmp_path, command):
    """On a copy of the world (a write here is a real one): one example per command of what the property above
    leaves out. Before `..` after a missing folder was refused, caption and evaluate replaced the bundle's
    encoder.onnx or the dataset's captions.txt (exit 0), export wrote a bundle into the run folder (exit 0), and
    data synth generated the whole set, then failed on 'Device or resource busy', leaving a folder in the run."""
    copy = World(base=tmp_path, run=Path(shutil.copytree(world.run, tmp_path / "run")),
                 bundle=Path(shutil.copytree(world.bundle, tmp_path / "bundle")),
                 data=Path(shutil.copytree(world.data, tmp_path / "data")),
                 photo=Path(shutil.copy(world.photo, tmp_path / "photo.jpg")), links=world.links)
    args = {
        "caption": ["caption", copy.photo, "--model", copy.bundle, "--html", "bundle/missing/../encoder.onnx"],
        "evaluate": ["evaluate", copy.bundle, "--dataset", copy.data, "--limit", "2", "--out",
                     "data/missing/../captions.txt"],  # no --force needed
        "export": ["export", copy.run, "--exporter", "torchscript", "--out", "run/missing/.."],
        "data synth": ["data", "synth", "--images", "2", "run/missing/.."],
    }[command]
    before = {name: sorted(p.name for p in getattr(copy, name).iterdir()) for name in ("run", "bundle", "data")}
    check_refused(copy, args, "", False, link_may_be_replaced=False)
    assert {name: sorted(p.name for p in getattr(copy, name).iterdir()) for name in before} == before
