"""Issue 9 item 3: user text (file names) is never rich markup or emoji, JSON paths are exactly the paths given,
and names that are not valid UTF-8 do not crash a strict UTF-8 stdout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_env, tiny_plugin
from typer.testing import CliRunner

from capcli.cli import app

NOT_UTF8 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name on a UTF-8 system: a lone surrogate in Python
HOSTILE = ["[/b].jpg", "[bold red]x[/].png", ":thumbs_up: photo.jpg", NOT_UTF8]


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("user-text")
    with tiny_plugin(tmp / "plugin"):
        yield tiny_env(tmp, small_synthetic)


@pytest.fixture
def hostile_folder(tmp_path, small_synthetic, monkeypatch) -> Path:
    """The hostile names as real images, in the current folder (short relative paths, as users type them)."""
    source = sorted((small_synthetic / "Images").glob("*.jpg"))[0]
    for name in HOSTILE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)  # "[/b].jpg" is b].jpg in a folder "["
        shutil.copy(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_item3_table_shows_names_literally(env, hostile_folder):
    result = CliRunner().invoke(app, ["caption", *HOSTILE, "--model", str(env["bundle"]), "--provider", "cpu",
                                      "--beam-size", "1", "--html", "report.html"])
    assert result.exit_code == 0, (result.output, result.exception)
    for name in HOSTILE[:3]:
        assert name in result.stdout, name  # not eaten as markup, not turned into an emoji
    assert "\U0001f44d" not in result.stdout
    assert "caf\\xe9.png" in result.stdout  # the undecodable byte shown as an escape
    assert "report.html" in result.stderr and (hostile_folder / "report.html").is_file()


def test_item3_json_paths_are_exactly_the_paths_given(env, hostile_folder):
    args = [*HOSTILE, "./" + HOSTILE[0], str(hostile_folder / HOSTILE[2])]
    result = CliRunner().invoke(app, ["caption", *args, "--model", str(env["bundle"]), "--provider", "cpu",
                                      "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["image"] for row in rows] == args
    assert os.fsencode(rows[3]["image"]) == b"caf\xe9.png"
    assert all(row["caption"] for row in rows)


def test_item3_error_lines_show_names_literally(env, hostile_folder):
    missing = "[red]gone[/red] :fire:.png"
    result = CliRunner().invoke(app, ["caption", missing, HOSTILE[0], "--model", str(env["bundle"]),
                                      "--provider", "cpu"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: no file matches"]  # a glob that matched nothing, named as given


@pytest.mark.parametrize("mode", [[], ["--json"]])
def test_item3_undecodable_names_under_a_strict_utf8_stdout(env, hostile_folder, mode):
    environ = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "capcli", "caption", os.fsencode(NOT_UTF8), HOSTILE[1], "--model",
         str(env["bundle"]), "--provider", "cpu", *mode],
        capture_output=True, env=environ, cwd=hostile_folder, timeout=300,
    )
    stdout, stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")  # both must be valid UTF-8
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    if mode:
        rows = [json.loads(line) for line in stdout.splitlines()]
        assert [os.fsencode(r["image"]) for r in rows] == [b"caf\xe9.png", os.fsencode(HOSTILE[1])]
    else:
        assert "caf\\xe9.png" in stdout and HOSTILE[1] in stdout
