"""Issue 29 items 4, 6 and 7: a run's SCST goes on as it was started, is never blocked by an SCST killed before
its first epoch, and finds its dataset from any folder (or is told where it is).

4. `capcli scst runs/pool --epochs 3 ...` killed during epoch 2, then `capcli scst runs/pool`, ran epochs 2-10: a
   plain rerun now finishes the job as started (its --epochs and --patience), a new --epochs changes it. The
   same holds for `capcli train --resume`.
6. SCST killed before its first epoch left best_xe.pt and no scst/, and `capcli train --resume` then said the
   run "went on with self-critical training" for good. Now SCST writes nothing before its first epoch ends, and
   a run left that way by an older capcli resumes (best_xe.pt was a copy of best.pt).
7. A run remembered its dataset as typed (`data/shapes`), so `cd elsewhere && capcli scst /abs/run` failed: now a
   path is stored absolute (names like `synthetic` stay names), and `capcli scst` takes --dataset/--images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import capcli.train.scst as scst_module
from capcli.cli import app
from capcli.model import checkpoint

REAL_RUN_EPOCH = scst_module.run_epoch
QUICK = ("--batch-size", "32", "--samples", "2", "--val-sample", "8", "--device", "cpu")


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def epochs_done(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "scst" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def interrupt_epoch(monkeypatch, at: int) -> None:
    """SCST's epoch number `at` (1-based) is interrupted as Ctrl-C would."""
    real, calls = scst_module.run_epoch, []

    def run_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scst_module, "run_epoch", run_epoch)


# --- item 4 -------------------------------------------------------------------------------------------------------


def test_a_plain_scst_rerun_finishes_the_run_as_started(run, monkeypatch):
    interrupt_epoch(monkeypatch, at=2)
    assert invoke("scst", run, "--epochs", "3", "--patience", "5", *QUICK).exit_code == 130
    assert epochs_done(run) == [1]
    monkeypatch.setattr(scst_module, "run_epoch", REAL_RUN_EPOCH)
    result = invoke("scst", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert epochs_done(run) == [1, 2, 3]  # not 2-10 with the default --epochs 10
    saved = checkpoint.load(run / "scst" / "last.pt")["scst_config"]
    assert (saved["epochs"], saved["patience"]) == (3, 5)
    assert invoke("scst", run, "--epochs", "4", "--device", "cpu").exit_code == 0  # a new --epochs goes on
    assert epochs_done(run) == [1, 2, 3, 4]


def test_a_plain_train_resume_keeps_the_runs_epochs(run):
    """tiny_run was trained with 2 epochs: --resume without --epochs has nothing left to do (it trained 18 more)."""
    before = snapshot(run)
    result = invoke("train", "--resume", "--out", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert checkpoint.load(run / "last.pt")["epoch"] == 1
    assert snapshot(run)["last.pt"] == before["last.pt"]


# --- item 6 -------------------------------------------------------------------------------------------------------


def test_scst_interrupted_in_its_first_epoch_leaves_the_run_as_it_was(run, monkeypatch):
    before = snapshot(run)
    interrupt_epoch(monkeypatch, at=1)
    assert invoke("scst", run, "--epochs", "2", *QUICK).exit_code == 130
    assert snapshot(run) == before  # no best_xe.pt, no scst/
    monkeypatch.setattr(scst_module, "run_epoch", REAL_RUN_EPOCH)
    result = invoke("train", "--resume", "--out", run, "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_a_run_left_with_only_best_xe_by_a_killed_scst_resumes(run):
    """What an SCST killed before its first epoch left before: best_xe.pt (a copy of best.pt), no scst/."""
    shutil.copy(run / "best.pt", run / "best_xe.pt")
    result = invoke("train", "--resume", "--out", run, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "best_xe.pt" in result.stderr and not (run / "best_xe.pt").exists()
    result = invoke("scst", run, "--epochs", "1", *QUICK)  # and SCST starts from the run's best
    assert result.exit_code == 0, result.output
    assert (run / "best_xe.pt").is_file() and epochs_done(run) == [1]


def test_a_run_that_went_on_with_scst_says_how_to_continue(run):
    assert invoke("scst", run, "--epochs", "1", *QUICK).exit_code == 0
    before = snapshot(run)
    line = one_line_error(invoke("train", "--resume", "--out", run, "--device", "cpu"))
    assert f"capcli scst {run}" in line and "another --out" in line, line
    assert snapshot(run) == before


# --- item 7 -------------------------------------------------------------------------------------------------------


def test_a_dataset_path_is_stored_absolute_and_a_name_stays_a_name(tmp_path, monkeypatch):
    from capcli.data.readers import stored_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    (tmp_path / "synthetic").mkdir()  # a folder named like a dataset name: the name wins, as load_dataset reads it
    assert stored_dataset("shapes") == str(tmp_path / "shapes")
    assert stored_dataset("./shapes/") == str(tmp_path / "shapes")
    assert stored_dataset("synthetic") == "synthetic" and stored_dataset("flickr8k") == "flickr8k"
    assert stored_dataset("not-there") == "not-there"  # refused later, by load_dataset, in its words


def test_train_records_the_dataset_so_scst_finds_it_from_another_folder(small_synthetic, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(small_synthetic, work / "data" / "shapes")
    monkeypatch.chdir(work)
    result = invoke("train", "--backbone", "efficientnet_lite0", "--dataset", "data/shapes", "--images",
                    "data/shapes/Images", "--epochs", "1", "--batch-size", "64", "--embed-dim", "8", "--hidden-dim",
                    "16", "--threshold", "2", "--val-sample", "8", "--decoder", "pooled", "--device", "cpu",
                    "--out", "runs/pool")
    assert result.exit_code == 0, result.output
    train = json.loads((work / "runs" / "pool" / "config.json").read_text())["train"]
    assert train["dataset"] == str(work / "data" / "shapes")
    assert train["images"] == str(work / "data" / "shapes" / "Images")
    monkeypatch.chdir(elsewhere)
    result = invoke("scst", work / "runs" / "pool", "--epochs", "1", *QUICK)
    assert result.exit_code == 0, result.output


def set_dataset(run: Path, spec: str) -> None:
    """The run as an older capcli left it: its dataset as it was typed, relative to where it was trained."""
    for name in ("best.pt", "last.pt"):
        ckpt = checkpoint.load(run / name)
        ckpt["train_config"]["dataset"] = spec
        checkpoint.save(run / name, ckpt)


def test_scst_names_a_dataset_it_cannot_find_and_takes_dataset_and_images(run, small_synthetic, tmp_path):
    set_dataset(run, "data/shapes")
    before = snapshot(run)
    line = one_line_error(invoke("scst", run, "--epochs", "1", *QUICK))
    assert "data/shapes" in line and "--dataset" in line, line
    assert snapshot(run) == before
    moved = Path(shutil.copytree(small_synthetic, tmp_path / "moved"))
    images = Path(shutil.move(moved / "Images", tmp_path / "pictures"))
    result = invoke("scst", run, "--epochs", "1", "--dataset", moved, "--images", images, *QUICK)
    assert result.exit_code == 0, result.output
    saved = checkpoint.load(run / "scst" / "last.pt")["scst_config"]
    assert (saved["dataset"], saved["images"]) == (str(moved), str(images))
    result = invoke("scst", run, "--epochs", "2", "--device", "cpu")  # a rerun keeps the override
    assert result.exit_code == 0, result.output
    assert epochs_done(run) == [1, 2]


def test_scst_refuses_a_dataset_other_than_the_runs(run, tmp_path):
    """A set replaced under the run (data synth --force) or the wrong folder passed: never trained on silently."""
    from capcli.data.synthetic import build

    other = build(tmp_path / "other", n_images=120, seed=7)
    before = snapshot(run)
    line = one_line_error(invoke("scst", run, "--epochs", "1", "--dataset", other, *QUICK))
    assert "not the dataset" in line and str(other) in line, line
    assert snapshot(run) == before
