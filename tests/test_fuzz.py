"""Property test (issue 9): generated hostile inputs thrown at `caption`, `export`, `train` and `evaluate`.

The world is a folder of inputs a careless user might have: images with [brackets], :colons: and names that
are not UTF-8, empty, garbage and huge-dimension images, folders without images, a bundle, a run and a
dataset. Each example builds a command line from hostile pieces (paths, option values, hand-edited
manifests) and runs it through the real CLI. Whatever the input, these must hold:

- the exit code is 0, 1 or 2, and no exception escapes (no traceback);
- a failure says so in one line `error: ...` per problem on stderr, with no Python warning or traceback;
- with --json, every stdout line is valid JSON;
- no file outside the command's outputs changes (the inputs, the bundle, the run, the dataset).

Examples are derandomized (the same every run) and few, because every one runs real captioning or training;
CAPCLI_FUZZ_EXAMPLES=200 (say) hunts deeper.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_models import tiny_env, tiny_plugin
from typer.testing import CliRunner

from capcli.cli import app

NOT_UTF8 = os.fsdecode(b"\xff\xfeimage.png")
IMAGE_NAMES = ["good.png", "[/b].jpg", "[bold]x[/bold].png", ":thumbs_up: photo.jpg", NOT_UTF8, "empty.png",
               "garbage.jpg", "wide.png", "huge.png", "notes.txt"]
PYTHON_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning", re.M)
EXPORT_FILES = {"encoder.onnx", "decoder.onnx", "vocab.json", "capcli.json"}
FUZZ = settings(max_examples=int(os.environ.get("CAPCLI_FUZZ_EXAMPLES", "10")),  # more for a deeper hunt
                deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as generated
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _make_inputs(folder: Path, sample: Path) -> None:
    folder.mkdir()
    for name in IMAGE_NAMES[:5]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample, folder / name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    Image.new("RGB", (20_000, 2), "red").save(folder / "wide.png")  # extreme aspect ratio
    Image.new("1", (12_000, 12_000)).save(folder / "huge.png")  # 144 megapixels in a few kB
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "no_images").mkdir()
    (folder / "no_images" / "readme.md").write_text("nothing to see\n")
    (folder / "empty_dir").mkdir()


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_synthetic):
    """The inputs (never to be changed) and a patched, java-free scorer for speed."""
    import functools

    import capcli.metrics

    root = tmp_path_factory.mktemp("fuzz")
    with tiny_plugin(root / "plugin"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(capcli.metrics, "score_captions",
                   functools.partial(capcli.metrics.score_captions, meteor=False, tokenizer="simple"))
        made = tiny_env(root / "made", small_synthetic)
        inputs = root / "world"
        inputs.mkdir()
        shutil.copytree(small_synthetic, inputs / "data")
        shutil.copytree(made["bundle"], inputs / "bundle")
        shutil.copytree(made["run"], inputs / "run")
        _make_inputs(inputs / "images", sorted((small_synthetic / "Images").glob("*.jpg"))[0])
        (inputs / "garbage_run").mkdir()
        (inputs / "garbage_run" / "best.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
        yield inputs


def snapshot(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@contextlib.contextmanager
def scratch():
    """A fresh current folder for each example (outputs without a path land here)."""
    old = os.getcwd()
    folder = Path(tempfile.mkdtemp(prefix="capcli-fuzz-"))
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(old)
        shutil.rmtree(folder, ignore_errors=True)


def check(world: Path, args: list[str], outputs: dict[str, str]) -> None:
    """Run the command and assert the properties. outputs: path -> "file" | "bundle" | "run" (what it may hold).

    The inputs are the world and, when the example made one, the hand-edited bundle in the current folder.
    """
    inputs = [world, *(p for p in [Path.cwd() / "edited"] if p.is_dir())]
    before = {k: v for root in inputs for k, v in snapshot(root).items()}
    result = CliRunner().invoke(app, args)
    event(f"exit {result.exit_code}")
    shown = f"args={args!r}\nexit={result.exit_code}\nstdout={result.stdout[-1500:]}\nstderr={result.stderr[-1500:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{shown}")
    assert result.exit_code in (0, 1, 2), shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert not PYTHON_WARNING.search(result.stderr), shown  # library noise is not a message for the user
    if result.exit_code != 0:  # each problem is one line "error: ..." (caption names each failed image)
        assert any(line.startswith("error: ") for line in result.stderr.splitlines()), shown
    if "--json" in args and result.stdout.strip():
        for line in result.stdout.splitlines():
            json.loads(line)  # every stdout line is JSON
    after = {k: v for root in inputs for k, v in snapshot(root).items()}
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    outside = {p for p in changed if not _allowed(Path(p), outputs)}
    assert not outside, f"changed, added or removed outside the outputs: {outside}\n{shown}"


def _allowed(path: Path, outputs: dict[str, str]) -> bool:
    for out, kind in outputs.items():
        out = Path(out)
        if kind == "file" and path == out:
            return True
        if kind == "bundle" and path.parent == out and path.name in EXPORT_FILES:
            return True
        if kind == "run" and out in path.parents:
            return True
    return False


# --- strategies -------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
MANIFEST_KEYS = ["format", "format_version", "backbone", "preprocessing", "preprocessing.input_size",
                 "preprocessing.resize", "preprocessing.mean", "preprocessing.std", "preprocessing.interpolation",
                 "vocab_size", "vocab_sha256", "special_tokens", "special_tokens.start", "special_tokens.end",
                 "max_len", "decoder", "decoder.hidden_dim", "decoder.num_layers", "files", "files.decoder",
                 "files.vocab", "sha256", "sha256.decoder.onnx", "source_checkpoint", "source_checkpoint_sha256",
                 "dataset", "dataset.spec", "dataset.seed"]
manifest_edits = st.lists(st.tuples(st.sampled_from(MANIFEST_KEYS), st.one_of(st.just("<delete>"), json_values)),
                          max_size=3)
hostile_names = st.sampled_from(["out", "[x]", ":fire: out", "a b", NOT_UTF8, "-dash", "x" * 200, ".hidden"])


def _edit(meta: dict, key: str, value) -> None:
    if key.startswith("sha256."):
        parents, last = ["sha256"], key.split(".", 1)[1]
    else:
        *parents, last = key.split(".")
    node = meta
    for part in parents:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return
        node = node[part]
    if value == "<delete>":
        node.pop(last, None)
    else:
        node[last] = value


def model_folder(world: Path, scratch_dir: Path, choice: str, edits, raw: bytes | None) -> str:
    """The --model for an example: the intact bundle, a hand-edited copy, the run, or nonsense."""
    if choice == "edited":
        copy = scratch_dir / "edited"
        shutil.copytree(world / "bundle", copy)
        if raw is not None:
            (copy / "capcli.json").write_bytes(raw)
        else:
            meta = json.loads((copy / "capcli.json").read_text())
            for key, value in edits:
                _edit(meta, key, value)
            (copy / "capcli.json").write_text(json.dumps(meta))
        return str(copy)
    return {"bundle": str(world / "bundle"), "run": str(world / "run"), "missing": str(world / "nope"),
            "images": str(world / "images"), "empty": ""}[choice]


models = st.sampled_from(["bundle", "bundle", "edited", "edited", "run", "missing", "images", "empty"])
raw_manifests = st.one_of(st.none(), st.none(), st.binary(max_size=40),
                          st.sampled_from([b"[]", b"null", b'{"format": "capcli-bundle"}', b"\xff\xfe{"]))


def output_path(world: Path, scratch_dir: Path, kind: str, name: str) -> str:
    return {"fresh": str(scratch_dir / "outs" / name), "folder": str(scratch_dir),
            "under_file": str(world / "images" / "notes.txt" / name), "input": str(world / "images" / "good.png"),
            "empty": "", "bundle": str(world / "bundle"), "data": str(world / "data")}[kind]


# Each command starts from a valid command line and gets up to two hostile overrides, so that most examples
# get past option parsing and reach the code that reads files, loads bundles and writes outputs.
overrides = st.lists  # (option, value) pairs drawn from a command's hostile list; value None = a flag


def each_alone(hostile: list[tuple[str, str | None]], **plain):
    """Explicit examples: every hostile override once on its own, besides the generated combinations."""
    def decorate(test):
        for change in reversed(hostile):
            test = example(changes=[change], **plain)(test)
        return test

    return decorate


def with_overrides(base: dict[str, str | None], changes: list[tuple[str, str | None]]) -> list[str]:
    options = dict(base)
    options.update(changes)
    args: list[str] = []
    for option, value in options.items():
        args += [option] if value is None else [option, value]
    return args


# --- caption -----------------------------------------------------------------------------------------------------

image_args = st.lists(st.sampled_from(
    [*(f"images/{n}" for n in IMAGE_NAMES), "images/good.png", "images/missing [1].png", "images",
     "images/no_images", "images/empty_dir", "images/*.png", "images/[", "*.nothing", "",
     "data/Images/synth_00001.png"]), min_size=1, max_size=4)
CAPTION_HOSTILE = [("--beam-size", "1"), ("--beam-size", "0"), ("--beams", "2"), ("--beams", "4"),
                   ("--batch-size", "1000"), ("--batch-size", "1"), ("--batch-size", "0"), ("--runtime", "torch"),
                   ("--runtime", "tensorflow"), ("--sample", None), ("--temperature", "nan"),
                   ("--temperature", "inf"), ("--temperature", "0"), ("--top-k", "-1"), ("--top-k", "3"),
                   ("--provider", "gpu"), ("--seed", "-5"), ("--device", "tpu")]


@FUZZ
@each_alone(CAPTION_HOSTILE, images=["images/good.png"], model="bundle", edits=[], raw=None, json_out=True, html=None,
            name="out")
@given(images=image_args, model=models, edits=manifest_edits, raw=raw_manifests, json_out=st.booleans(),
       changes=overrides(st.sampled_from(CAPTION_HOSTILE), max_size=2),
       html=st.sampled_from([None, None, "fresh", "folder", "under_file", "input"]), name=hostile_names)
def test_fuzz_caption(world, images, model, edits, raw, json_out, changes, html, name):
    with scratch() as here:
        base = {"--model": model_folder(world, here, model, edits, raw), "--beam-size": "3", "--provider": "cpu",
                "--runtime": "torch" if model == "run" else "onnx"}
        args = ["caption", *(str(world / a) if a else a for a in images), *with_overrides(base, changes)]
        args += ["--json"] if json_out else []
        outputs = {}
        if html:
            path = output_path(world, here, html, name + ".html")
            args += ["--html", path]
            outputs[path] = "file"
        check(world, args, outputs)


# --- export ------------------------------------------------------------------------------------------------------

EXPORT_HOSTILE = [("--opset", "17"), ("--opset", "0"), ("--opset", "999999"), ("--opset", "x"),
                  ("--exporter", ""), ("--exporter", "[bold]"), ("--exporter", "onnx"), ("--force", None)]


@FUZZ
@each_alone(EXPORT_HOSTILE, run="run", out="fresh", name="out", images=[])
@given(run=st.sampled_from(["run", "run", "run", "run/best.pt", "bundle", "garbage_run", "nope", "images/notes.txt",
                            ""]),
       out=st.sampled_from(["fresh", "fresh", "fresh", "bundle", "data", "under_file", "input", "empty", None]),
       name=hostile_names, images=st.lists(st.sampled_from(IMAGE_NAMES + ["no_images", "missing.png"]), max_size=3),
       changes=overrides(st.sampled_from(EXPORT_HOSTILE), max_size=2))
def test_fuzz_export(world, run, out, name, images, changes):
    with scratch() as here:
        base = {"--exporter": "torchscript"}  # the dynamo exporter is tested elsewhere; here speed matters
        args = ["export", str(world / run) if run else "", *with_overrides(base, changes)]
        outputs = {}
        if out is not None:
            path = output_path(world, here, out, name)
            args += ["--out", path]
            outputs[path] = "bundle"
        for image in images:
            args += ["--images", str(world / "images" / image)]
        check(world, args, outputs)


# --- evaluate ----------------------------------------------------------------------------------------------------

EVALUATE_HOSTILE = [("--dataset", "images"), ("--dataset", "nope"), ("--dataset", "images/notes.txt"),
                    ("--split", "val"), ("--split", ""), ("--split", "[x]"), ("--limit", "0"), ("--limit", "-3"),
                    ("--limit", "1"), ("--beam-size", "0"), ("--beam-size", "1"), ("--runtime", "torch"),
                    ("--runtime", "x"), ("--allow-missing", None), ("--images", "images"), ("--images", "nope")]


@FUZZ
@each_alone(EVALUATE_HOSTILE, model="bundle", edits=[], raw=None, json_out=True, out="fresh", name="out")
@given(model=models, edits=manifest_edits, raw=raw_manifests, json_out=st.booleans(),
       changes=overrides(st.sampled_from(EVALUATE_HOSTILE), max_size=2),
       out=st.sampled_from([None, "fresh", "fresh", "folder", "under_file", "input", "empty"]), name=hostile_names)
def test_fuzz_evaluate(world, model, edits, raw, json_out, changes, out, name):
    with scratch() as here:
        base = {"--limit": "4", "--beam-size": "2", "--provider": "cpu",
                "--runtime": "torch" if model == "run" else "onnx"}
        changes = [(o, str(world / v) if o in ("--dataset", "--images") else v) for o, v in changes]
        args = ["evaluate", model_folder(world, here, model, edits, raw), *with_overrides(base, changes)]
        args += ["--json"] if json_out else []
        outputs = {}
        if out is not None:
            path = output_path(world, here, out, name + ".json")
            args += ["--out", path]
            outputs[path] = "file"
        check(world, args, outputs)


# --- train -------------------------------------------------------------------------------------------------------

TRAIN_HOSTILE = [("--backbone", ""), ("--backbone", "nope"), ("--dataset", "images"), ("--dataset", "nope"),
                 ("--dataset", "images/notes.txt"), ("--weights", "/no/such.pt"), ("--weights", "images/garbage.jpg"),
                 ("--epochs", "0"), ("--epochs", "-1"), ("--max-len", "0"), ("--max-len", "-2"),
                 ("--threshold", "0"), ("--threshold", "1000"), ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"),
                 ("--embed-dim", "0"), ("--hidden-dim", "-3"), ("--num-layers", "0"), ("--num-layers", "2"),
                 ("--dropout", "1.5"), ("--dropout", "-0.1"), ("--batch-size", "0"), ("--batch-size", "100000"),
                 ("--workers", "-1"), ("--patience", "-1"), ("--lr-decay", "-2"), ("--feature-input", None)]
TRAIN_OUT = ["fresh", "fresh", "fresh", "run", "data", "under_file", "input", "empty"]


@FUZZ
@each_alone(TRAIN_HOSTILE, out="fresh", name="out")
@given(changes=overrides(st.sampled_from(TRAIN_HOSTILE), max_size=2), out=st.sampled_from(TRAIN_OUT),
       name=hostile_names)
def test_fuzz_train(world, changes, out, name):
    with scratch() as here:
        path = output_path(world, here, out, name) if out != "run" else str(world / "run")
        base = {"--backbone": "tiny", "--dataset": str(world / "data"), "--weights": "none", "--epochs": "1",
                "--max-len": "6", "--threshold": "2", "--embed-dim": "8", "--hidden-dim": "8", "--batch-size": "64",
                "--workers": "0", "--device": "cpu", "--out": path}
        changes = [(o, str(world / v) if o == "--dataset" or v in ("images/garbage.jpg",) else v) for o, v in changes]
        args = ["train", *with_overrides(base, changes)]
        check(world, args, {path: "run"} if out == "fresh" else {})
