"""Issue 29 items 1 and 3: a dataset is never replaced without --force (and --force replaces only a synthetic
set), `data synth` is bounded and removes what killed runs left.

Every refusal is one line on stderr, a non-zero exit, and the folder as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.synthetic import build

DATA = Path(__file__).parent / "data"


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def shapes(tmp_path) -> Path:
    return build(tmp_path / "data" / "shapes", n_images=12, seed=0, size=48)


# --- item 1: a dataset is never replaced without --force -----------------------------------------------------


def test_synth_over_an_existing_set_is_refused_without_force(shapes):
    """Before: `capcli data synth data/shapes --images 5` over a 300-image set printed only the folder, which then
    held 5 images."""
    before = snapshot(shapes)
    line = one_line_error(invoke("data", "synth", shapes, "--images", "5", "--size", "48"))
    assert "already holds a synthetic set of 12 images" in line and "--force" in line, line
    assert snapshot(shapes) == before


def test_synth_with_force_replaces_the_set(shapes):
    result = invoke("data", "synth", shapes, "--images", "5", "--size", "48", "--force")
    assert result.exit_code == 0, result.output
    assert len(list((shapes / "Images").iterdir())) == 5


def test_the_same_set_again_is_kept_as_it_is(shapes):
    """Asking for the set that is already there writes nothing (scripts may rerun it)."""
    before = {p: p.stat().st_mtime_ns for p in shapes.rglob("*")}
    result = invoke("data", "synth", shapes, "--images", "12", "--size", "48")
    assert result.exit_code == 0, result.output
    assert "already holds this set" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in shapes.rglob("*")} == before


def test_force_never_replaces_a_set_holding_other_files(shapes):
    """--force replaces a synthetic set, not what someone put in its folder (notes, a run, features)."""
    (shapes / "runs").mkdir()
    (shapes / "runs" / "notes.txt").write_text("mine\n")
    before = snapshot(shapes)
    line = one_line_error(invoke("data", "synth", shapes, "--images", "5", "--size", "48", "--force"))
    assert "runs" in line and "not part of the synthetic set" in line, line
    assert snapshot(shapes) == before


def test_a_link_to_a_set_is_never_replaced_by_a_folder(shapes):
    """Found trying item 1's fix: with --force, OUT a symbolic link to a set was replaced by a new folder (the link
    gone, its set untouched); the same set through the link is still a no-op."""
    link = shapes.parent / "link"
    link.symlink_to(shapes)
    line = one_line_error(invoke("data", "synth", link, "--images", "5", "--size", "48", "--force"))
    assert "symbolic link" in line, line
    assert link.is_symlink() and len(list((shapes / "Images").iterdir())) == 12
    assert invoke("data", "synth", link, "--images", "12", "--size", "48").exit_code == 0


# --- item 3: bounds, and the staging folders of killed runs ----------------------------------------------------


def limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a refusal needs little; a 100000-pixel image 30 GB


@pytest.mark.parametrize(("option", "value"), [("--size", "100000"), ("--images", "100000000")])
def test_synth_sizes_are_bounded(tmp_path, option, value):
    """Before: --size 100000 was a MemoryError traceback in Image.new (or a minute-long silent run). Run with
    3 GB of address space, so that a missing bound fails here rather than exhausting the machine."""
    result = subprocess.run([sys.executable, "-m", "capcli", "data", "synth", str(tmp_path / "big"), option, value],
                            capture_output=True, text=True, timeout=120, preexec_fn=limited_memory)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_negative_seed_is_one_line(tmp_path):
    """Found beside item 3: --seed -1 was a numpy traceback ('expected non-negative integer')."""
    line = one_line_error(invoke("data", "synth", tmp_path / "s", "--images", "2", "--seed", "-1"), code=2)
    assert "--seed" in line and list(tmp_path.iterdir()) == []


def test_synth_removes_the_staging_folders_of_killed_runs(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f".hs.{dead.stdout.strip()}.x1y2.tmp", tmp_path / ".hs.k3j_zq.tmp"]  # ours, and the old naming
    alive = tmp_path / f".hs.{os.getpid()}.abcd.tmp"  # a synth still running (this process)
    other = tmp_path / ".other.k3j_zq.tmp"  # another folder's staging: not ours to judge
    for folder in (*stale, alive, other):
        folder.mkdir()
        (folder / "Images").mkdir()
    result = invoke("data", "synth", tmp_path / "hs", "--images", "3", "--size", "48")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "hs"])


def test_evaluate_says_when_the_models_dataset_was_replaced_since(tmp_path, small_synthetic):
    """What item 1 led to: after the set was replaced, `capcli evaluate BUNDLE` silently scored the new set's test
    split (1 image) as the model's own."""
    from tiny_models import tiny_checkpoint, tiny_plugin

    from capcli.bundle.build import export
    from capcli.data.readers import load_dataset
    from capcli.model import checkpoint

    data = build(tmp_path / "shapes", n_images=40, seed=0, size=48)
    with tiny_plugin(tmp_path / "plugin"):
        run = tiny_checkpoint(tmp_path / "run", data)
        ckpt = checkpoint.load(run / "best.pt")
        ckpt["dataset_fingerprint"] = load_dataset(str(data)).fingerprint()
        checkpoint.save(run / "best.pt", ckpt)
        bundle = export(run, tmp_path / "bundle", exporter="torchscript")
        quiet = invoke("evaluate", bundle, "--limit", "2", "--out", tmp_path / "e.json")
        assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output
        assert invoke("data", "synth", data, "--images", "10", "--size", "48", "--force").exit_code == 0
        result = invoke("evaluate", bundle, "--limit", "2", "--out", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not the data the model was trained on" in warnings[0], result.stderr
