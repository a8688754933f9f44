"""Outputs never destroy inputs (issue 19 item 1) and failures leave nothing behind (item 2, export's staging).

Every file a command writes refuses a path that is one of its inputs, a file of a bundle or of a training run,
or an existing file capcli did not write (that one unless --force): one line, exit 1, nothing changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_checkpoint, tiny_plugin
from typer.testing import CliRunner

from capcli.bundle.build import export
from capcli.cli import app


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("protected")
    with tiny_plugin(tmp / "plugin"):
        run = tiny_checkpoint(tmp / "run", small_synthetic)
        yield {"run": run, "bundle": export(run, tmp / "bundle", exporter="torchscript"), "data": small_synthetic}


@pytest.fixture
def photo(env, tmp_path) -> Path:
    source = next((env["data"] / "Images").iterdir())
    return Path(shutil.copy(source, tmp_path / "photo.jpg"))


def invoke(*args: str):
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


def test_caption_html_never_replaces_the_image_it_captions(env, photo):
    before = photo.read_bytes()
    for extra in ((), ("--force",)):
        line = one_line_error(invoke("caption", photo, "--model", env["bundle"], "--html", photo, *extra))
        assert "is an input of this command" in line
        assert photo.read_bytes() == before


def test_caption_html_never_replaces_a_file_of_a_bundle_or_a_run(env, photo):
    bundle_before, run_before = snapshot(env["bundle"]), snapshot(env["run"])
    for target in (env["bundle"] / "encoder.onnx", env["bundle"] / "notes.txt", env["run"] / "best.pt",
                   env["run"] / "config.json"):
        existed = target.exists()
        if not existed:
            target.write_text("mine\n")
            bundle_before = snapshot(env["bundle"])
        try:
            for extra in ((), ("--force",)):
                line = one_line_error(invoke("caption", photo, "--model", env["bundle"], "--html", target, *extra))
                assert "is a file of the" in line, line
        finally:
            if not existed:
                target.unlink()
    bundle_before.pop("notes.txt", None)
    assert snapshot(env["bundle"]) == bundle_before and snapshot(env["run"]) == run_before


def test_caption_html_replaces_another_file_only_with_force_and_its_own_report_freely(env, photo, tmp_path):
    notes = tmp_path / "notes.html"
    notes.write_text("my notes\n")
    line = one_line_error(invoke("caption", photo, "--model", env["bundle"], "--html", notes))
    assert "was not written by capcli" in line and "--force" in line and notes.read_text() == "my notes\n"
    assert invoke("caption", photo, "--model", env["bundle"], "--html", notes, "--force").exit_code == 0
    assert notes.read_text().startswith("<!DOCTYPE html>")
    again = invoke("caption", photo, "--model", env["bundle"], "--html", notes)  # capcli's own report: replaced
    assert again.exit_code == 0, again.output


def test_evaluate_never_writes_inside_a_bundle(env):
    before = snapshot(env["bundle"])
    for out in (env["bundle"] / "capcli.json", env["bundle"] / "scores.json"):
        line = one_line_error(invoke("evaluate", env["bundle"], "--limit", "2", "--out", out, "--force"))
        assert "inside the bundle" in line
    assert snapshot(env["bundle"]) == before


def test_evaluate_default_output_refused_when_run_inside_the_bundle(env, monkeypatch):
    before = snapshot(env["bundle"])
    monkeypatch.chdir(env["bundle"])
    line = one_line_error(invoke("evaluate", ".", "--limit", "2"))
    assert "inside the bundle" in line and "--out" in line
    assert snapshot(env["bundle"]) == before


def test_evaluate_never_replaces_its_dataset(env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    captions = (data / "captions.txt").read_bytes()
    line = one_line_error(invoke("evaluate", env["bundle"], "--dataset", data, "--limit", "2", "--out",
                                 data / "captions.txt", "--force"))
    assert "is an input of this command" in line and (data / "captions.txt").read_bytes() == captions


def test_evaluate_replaces_its_own_report_but_another_file_only_with_force(env, tmp_path):
    other = tmp_path / "results.json"
    other.write_text('{"mine": true}\n')
    line = one_line_error(invoke("evaluate", env["bundle"], "--limit", "2", "--out", other))
    assert "was not written by capcli" in line and other.read_text() == '{"mine": true}\n'
    report = tmp_path / "evaluation.json"
    for _ in range(2):
        result = invoke("evaluate", env["bundle"], "--limit", "2", "--out", report)
        assert result.exit_code == 0, result.output
    assert invoke("evaluate", env["bundle"], "--limit", "2", "--out", other, "--force").exit_code == 0


def test_export_never_writes_into_a_training_run(env):
    before = snapshot(env["run"])
    line = one_line_error(invoke("export", env["run"], "--out", env["run"], "--force", "--exporter", "torchscript"))
    assert "training run" in line and snapshot(env["run"]) == before


def test_export_never_replaces_its_parity_images(env, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = [shutil.copy(p, folder / name) for p, name in
              zip(sorted((env["data"] / "Images").iterdir())[:2], ("vocab.json", "a.jpg"), strict=True)]
    before = snapshot(folder)
    line = one_line_error(invoke("export", env["run"], "--out", folder, "--force", "--exporter", "torchscript",
                                 *(x for p in images for x in ("--images", p))))
    assert "an input of this export" in line and snapshot(folder) == before


def test_export_removes_the_staging_folders_an_interrupted_export_left(env, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f".b.{dead.stdout.strip()}.x1y2.tmp", tmp_path / ".b.k3j_zq.tmp"]  # this and older naming
    alive = tmp_path / f".b.{os.getpid()}.abcd.tmp"  # an export still running (this process)
    for folder in (*stale, alive):
        folder.mkdir()
        (folder / "encoder.onnx").write_bytes(b"half")
    export(env["run"], tmp_path / "b", exporter="torchscript")
    assert not any(p.exists() for p in stale) and alive.is_dir()
