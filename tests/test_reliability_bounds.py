"""Issue 29 item 2: every option that sizes memory is bounded, in every command that has it.

`capcli caption photo.jpg --beam-size 100000` reached 5.4 GB in 3 s and ended in a numpy traceback, or ran for
minutes; serve capped the beam at 16 while caption and evaluate had no cap. Each option here is refused before
any work: one line naming the option, a non-zero exit, nothing written. (Each case would otherwise start its
command: on a model or dataset that does not exist where that is enough to tell, or with the long-running part
replaced by a stand-in.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.cli import app

ROOT = Path(__file__).parents[1]
PHOTO = ROOT / "tests" / "images" / "chelsea.jpg"
SHIPPED = ROOT / "exported" / "flickr8k"


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def refused(result, option: str) -> str:
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], result.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_the_cli_caps_the_beam_as_the_server_does():
    from capcli.cli.options import MAX_BEAM
    from capcli.serve.app import MAX_BEAM as SERVE_MAX_BEAM

    assert MAX_BEAM == SERVE_MAX_BEAM == 16


@pytest.mark.parametrize(("option", "value"), [("--beam-size", "17"), ("--beams", "17"), ("--batch-size", "100000")])
def test_caption_bounds(tmp_path, option, value):
    refused(invoke("caption", PHOTO, "--model", SHIPPED, option, value, "--html", tmp_path / "r.html"), option)
    assert not (tmp_path / "r.html").exists()


def test_a_huge_beam_is_refused_not_a_memory_error(tmp_path):
    """In a process with 3 GB of address space: before the cap, a numpy _ArrayMemoryError traceback."""
    import resource
    import subprocess
    import sys

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    result = subprocess.run([sys.executable, "-m", "capcli", "caption", str(PHOTO), "--model", str(SHIPPED),
                             "--beam-size", "100000"], capture_output=True, text=True, timeout=300, preexec_fn=limited)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--beam-size" in lines[0], result.stderr[-3000:]


def test_caption_at_the_cap_still_captions():
    result = invoke("caption", PHOTO, "--model", SHIPPED, "--beam-size", "16", "--beams", "16", "--json")
    assert result.exit_code == 0, result.output


def test_evaluate_bounds_the_beam(tmp_path):
    refused(invoke("evaluate", SHIPPED, "--dataset", tmp_path / "none", "--beam-size", "17"), "--beam-size")


def test_evaluate_bounds_the_beam_from_python_too(tmp_path):
    from capcli.errors import CapcliError
    from capcli.evaluate import evaluate

    with pytest.raises(CapcliError, match="--beam-size"):
        evaluate(SHIPPED, str(tmp_path / "none"), beam_size=100000)


@pytest.mark.parametrize(("option", "value"), [("--max-batch", "100000"), ("--max-files", "100000")])
def test_serve_bounds(monkeypatch, option, value):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # were it accepted, the server would not start here
    refused(invoke("serve", SHIPPED, option, value), option)


def test_features_bounds_its_batch(tmp_path):
    refused(invoke("features", "--backbone", "efficientnet_lite0", "--dataset", tmp_path / "none",
                   "--batch-size", "100000"), "--batch-size")


@pytest.mark.parametrize(("option", "value"), [("--max-len", "100000"), ("--batch-size", "10000000")])
def test_train_bounds(tmp_path, option, value):
    refused(invoke("train", "--backbone", "efficientnet_lite0", "--dataset", tmp_path / "none", "--out",
                   tmp_path / "run", option, value), option)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("option", "value"), [("--samples", "100000"), ("--batch-size", "10000000")])
def test_scst_bounds(tmp_path, option, value):
    refused(invoke("scst", tmp_path / "run", option, value), option)


def test_demo_bounds_its_images(monkeypatch):
    import capcli.demo

    monkeypatch.setattr(capcli.demo, "run_demo", lambda **k: None)  # were it accepted, the demo would not run here
    refused(invoke("demo", "--images", "100000000"), "--images")


# --- found beside item 2: the demo exports with --force -----------------------------------------------------------


@pytest.mark.parametrize("out", ["shipped", "notes"])
def test_the_demo_never_replaces_a_bundle_or_folder_not_its_own(tmp_path, monkeypatch, out):
    """`capcli demo --out exported/flickr8k` (or a folder of yours) was replaced at the demo's export step, which
    forces; now it is refused before any work."""
    import shutil

    import capcli.data.synthetic
    from capcli.errors import CapcliError

    def generate(*args, **kwargs):
        raise CapcliError("the demo started")

    monkeypatch.setattr(capcli.data.synthetic, "default_synthetic", generate)
    target = tmp_path / out
    if out == "shipped":
        shutil.copytree(SHIPPED, target)
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    line = refused(invoke("demo", "--out", target, "--run", tmp_path / "run"), "--out")
    assert "the demo started" not in line
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
