"""Issue 29 item 5: --force never replaces a file of a training run (SCST's files in run/scst/ included) nor a file
the command reads (the dataset's objects.json, split lists and images, besides its captions file).

Before: `capcli caption ... --html runs/x/scst/last.pt --force` wrote HTML over SCST's resume checkpoint (the next
`capcli scst` failed with an UnpicklingError) and `capcli evaluate ... --dataset data/s --out data/s/objects.json
--force` overwrote the ground truth the command had just read. The property test of output paths
(test_output_paths_property.py) draws every spelling of these targets; these are one example each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_reliability_outputs import env, invoke, one_line_error, snapshot  # noqa: F401 (env: the fixture)


@pytest.fixture
def world(env, tmp_path):  # noqa: F811 (env: imported above as a fixture)
    """A copy of the run as SCST leaves it, and a copy of the dataset (a write here is a real one)."""
    run = Path(shutil.copytree(env["run"], tmp_path / "run"))
    shutil.copy(run / "best.pt", run / "last.pt")
    shutil.copy(run / "best.pt", run / "best_xe.pt")
    (run / "scst").mkdir()
    shutil.copy(run / "best.pt", run / "scst" / "last.pt")
    (run / "scst" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    data = Path(shutil.copytree(env["data"], tmp_path / "data"))
    photo = Path(shutil.copy(next((data / "Images").iterdir()), tmp_path / "photo.jpg"))
    return {"run": run, "bundle": env["bundle"], "data": data, "photo": photo}


@pytest.mark.parametrize("name", ["scst/last.pt", "scst/metrics.jsonl", "best_xe.pt"])
def test_caption_html_with_force_never_replaces_a_file_of_a_run(world, name):
    before = snapshot(world["run"])
    line = one_line_error(invoke("caption", world["photo"], "--model", world["bundle"], "--html",
                                 world["run"] / name, "--force"))
    assert "training run" in line, line
    assert snapshot(world["run"]) == before


def test_evaluate_out_with_force_never_replaces_the_ground_truth_it_read(world):
    before = snapshot(world["data"])
    line = one_line_error(invoke("evaluate", world["bundle"], "--dataset", world["data"], "--limit", "2", "--out",
                                 world["data"] / "objects.json", "--force"))
    assert "objects.json" in line and "dataset" in line, line
    assert snapshot(world["data"]) == before


def test_evaluate_out_with_force_never_replaces_an_image_of_its_dataset(world):
    from capcli.data.readers import load_dataset

    train_image = load_dataset(str(world["data"])).splits["train"][0]  # not one this evaluation captions
    before = snapshot(world["data"])
    line = one_line_error(invoke("evaluate", world["bundle"], "--dataset", world["data"], "--limit", "2", "--out",
                                 world["data"] / "Images" / train_image, "--force"))
    assert "an image of the dataset" in line, line
    assert snapshot(world["data"]) == before


def test_export_with_force_never_writes_into_a_folder_of_a_run(world):
    before = snapshot(world["run"])
    line = one_line_error(invoke("export", world["run"], "--exporter", "torchscript", "--out",
                                 world["run"] / "scst", "--force"))
    assert "training run" in line, line
    assert snapshot(world["run"]) == before


def test_a_report_outside_the_run_is_still_written_with_force(world, tmp_path):
    notes = tmp_path / "notes.html"
    notes.write_text("mine\n")
    result = invoke("caption", world["photo"], "--model", world["bundle"], "--html", notes, "--force")
    assert result.exit_code == 0, result.output
