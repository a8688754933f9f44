"""`capcli data ...` under a root group that prints CapcliError as one line and exits 1, as capcli does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from capcli.cli import ErrorHandlingGroup as _Group
from capcli.cli.data import app as data_app

DATA = Path(__file__).parent / "data"
KAGGLE = DATA / "flickr8k_kaggle"


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    root = typer.Typer(cls=_Group, add_completion=False, pretty_exceptions_enable=False)
    root.add_typer(data_app, name="data")
    return root


def run(cli: typer.Typer, *args: str):
    return CliRunner().invoke(cli, ["data", *args])


def _one_line_error(result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_help_lists_commands(cli):
    result = run(cli, "--help")
    assert result.exit_code == 0
    for command in ("synth", "info", "download"):
        assert command in result.stdout


def test_synth_writes_a_set_and_may_replace_it(cli, tmp_path: Path):
    out = tmp_path / "set"
    result = run(cli, "synth", str(out), "--images", "12", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "images/s" in result.stderr
    assert len(list((out / "Images").glob("*.jpg"))) == 12
    assert (out / "objects.json").is_file()
    _one_line_error(run(cli, "synth", str(out), "--images", "6"), "--force")  # another set: only with --force
    assert len(list((out / "Images").glob("*.jpg"))) == 12
    again = run(cli, "synth", str(out), "--images", "6", "--force")
    assert again.exit_code == 0, again.output
    assert len(list((out / "Images").glob("*.jpg"))) == 6


def test_synth_refuses_a_folder_that_is_not_a_synthetic_set(cli, tmp_path: Path):
    (tmp_path / "precious.txt").write_text("keep me")
    _one_line_error(run(cli, "synth", str(tmp_path), "--images", "3"), "not empty")
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    _one_line_error(run(cli, "synth", str(tmp_path / "precious.txt")), "not a folder")


def test_synth_rejects_bad_counts(cli, tmp_path: Path):
    result = run(cli, "synth", str(tmp_path / "x"), "--images", "0")
    assert result.exit_code == 2  # click's own usage error


def test_info_table(cli):
    result = run(cli, "info", str(KAGGLE), "--threshold", "2")
    assert result.exit_code == 0, result.output
    for text in (
        "train",
        "val",
        "test",
        "19",
        "95",
        "missing images: 17",
        "unreadable images: none",
        "kaggle",
    ):
        assert text in result.stdout


def test_info_json_with_images_override(cli, tmp_path: Path):
    images = tmp_path / "pictures"
    shutil.copytree(KAGGLE / "Images", images)
    (images / "3423802527_94bd2b23b0.jpg").write_bytes(b"broken")
    result = run(cli, "info", str(KAGGLE / "captions.txt"), "--images", str(images), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["images_dir"] == str(images)
    assert info["images"] == 19 and info["captions"] == 95
    assert {s: v["images"] for s, v in info["splits"].items()} == {"train": 15, "val": 2, "test": 2}
    assert info["unreadable_images"] == ["3423802527_94bd2b23b0.jpg"]
    assert len(info["missing_images"]) == 16


def test_info_without_decoding(cli):
    result = run(cli, "info", str(KAGGLE), "--no-check-images", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images_checked"] == "existence only"


def test_info_bad_input_is_one_line(cli, tmp_path: Path):
    _one_line_error(run(cli, "info", str(tmp_path / "nothing")), "no such file or folder")
    (tmp_path / "x.txt").write_text("what is this\n")
    _one_line_error(run(cli, "info", str(tmp_path / "x.txt")), "unknown annotation format")
    _one_line_error(
        run(cli, "info", str(KAGGLE), "--images", str(tmp_path / "nope")), "no such images folder"
    )


def test_info_named_dataset_not_downloaded(cli, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    _one_line_error(run(cli, "info", "flickr30k"), "capcli data download flickr30k")


def test_download_offline_is_a_clear_error(cli, monkeypatch):
    import kagglehub

    def offline(handle: str, *args, **kwargs):
        raise ConnectionError(f"Failed to resolve 'www.kaggle.com' for {handle}\nmore detail")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    result = run(cli, "download", "flickr8k")
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "could not download flickr8k from Kaggle" in error
    assert "check the network / Kaggle credentials" in error


def test_download_success_prints_the_path(cli, monkeypatch, tmp_path: Path):
    import kagglehub

    seen = []
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle: seen.append(handle) or str(tmp_path))
    result = run(cli, "download", "flickr30k")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path)
    assert seen == ["hsankesara/flickr-image-dataset"]


def test_download_unknown_name(cli):
    _one_line_error(run(cli, "download", "imagenet"), "flickr8k, flickr30k")
