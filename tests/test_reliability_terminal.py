"""Terminal safety (issue 19 item 6): control characters in file names are shown escaped in every line capcli
prints, error lines included, on a terminal and in a pipe."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from tiny_models import tiny_checkpoint, tiny_plugin
from typer.testing import CliRunner

from capcli.bundle.build import export
from capcli.cli import app
from capcli.console import shown

ESC = "\x1b"
HOSTILE = f"a{ESC}[31mred{ESC}]0;title\x07\nforged line\r\x9b.jpg"


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("terminal")
    with tiny_plugin(tmp / "plugin"):
        run = tiny_checkpoint(tmp / "run", small_synthetic)
        bundle = export(run, tmp / "bundle", exporter="torchscript")
        images = tmp / "images"
        images.mkdir()
        shutil.copy(next((small_synthetic / "Images").iterdir()), images / HOSTILE)
        (images / f"broken{ESC}[2J\n.png").write_bytes(b"not an image")
        yield {"bundle": bundle, "images": images, "tmp": tmp}


def assert_safe(text: str) -> None:
    assert ESC not in text and "\x07" not in text and "\r" not in text and "\x9b" not in text, repr(text)
    assert "forged line" not in text.replace("\\nforged line", ""), repr(text)


def test_shown_escapes_control_characters():
    assert shown("a\x1b[31mb\nc\td\x00\x9b") == "a\\x1b[31mb\\nc\\td\\x00\\x9b"


def test_caption_table_and_error_lines_escape_names(env):
    result = CliRunner().invoke(app, ["caption", str(env["images"]), "--model", str(env["bundle"]),
                                      "--html", str(env["tmp"] / f"report{ESC}[1m\n.html")])
    assert result.exit_code == 1, result.output
    assert_safe(result.stdout)
    assert_safe(result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "broken\\x1b[2J\\n.png" in errors[0], result.stderr
    assert "report: " in result.stderr and "report\\x1b[1m\\n.html" in result.stderr
    assert "\\x1b[31mred" in result.stdout


def test_error_lines_escape_the_name_in_a_pipe(env, tmp_path):
    missing = tmp_path / f"x{ESC}[31m\ny.jpg"
    proc = subprocess.run([sys.executable, "-m", "capcli", "caption", str(missing), "--model", str(env["bundle"])],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert_safe(proc.stderr + proc.stdout)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "x\\x1b[31m\\ny.jpg" in lines[0], proc.stderr
