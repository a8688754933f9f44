"""Issue 9 item 9: `capcli caption` output is honest: no silent success on nothing, stdout stays JSON lines,
failed images are in the JSON stream, memory does not grow with --batch-size, --beams is validated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import tiny_env, tiny_plugin
from typer.testing import CliRunner

from capcli.cli import app
from capcli.runtime.captioner import ENCODE_CHUNK, caption_images, open_captioner


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("caption-output")
    with tiny_plugin(tmp / "plugin"):
        yield tiny_env(tmp, small_synthetic)


@pytest.fixture(scope="module")
def images(small_synthetic) -> list[Path]:
    return sorted((small_synthetic / "Images").glob("*.jpg"))


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_item9_an_empty_folder_or_one_without_images_is_an_error(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images in this folder" in one_line(run("caption", str(empty), "--model", str(env["bundle"])), 1)
    (empty / "notes.txt").write_text("not an image")
    assert "no images in this folder" in one_line(run("caption", str(empty), "--model", str(env["bundle"])), 1)


def test_an_image_that_cannot_be_captioned_alone_is_one_line_and_no_table(env, tmp_path):
    from PIL import Image

    Image.new("RGB", (6000, 1)).save(tmp_path / "strip.png")
    line = one_line(run("caption", str(tmp_path / "strip.png"), "--model", str(env["bundle"]), "--provider", "cpu"), 1)
    assert "strip.png: image too elongated" in line


def test_item9_an_empty_argument_is_an_error_not_the_current_folder(env, images, tmp_path, monkeypatch):
    shutil.copy(images[0], tmp_path / "here.png")
    monkeypatch.chdir(tmp_path)
    for args in ([""], ["  "], ["here.png", ""]):
        assert "empty" in one_line(run("caption", *args, "--model", str(env["bundle"])), 1)


def test_item9_json_and_html_keep_stdout_pure_json(env, images, tmp_path):
    html = tmp_path / "r.html"
    result = run("caption", str(images[0]), str(tmp_path / "gone.png"), "--model", str(env["bundle"]), "--json",
                 "--html", str(html), "--provider", "cpu")
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(images[0]), str(tmp_path / "gone.png")]
    assert rows[0]["caption"] and rows[0].get("error") is None
    assert rows[1]["caption"] is None and "no such file" in rows[1]["error"]
    assert f"report: {html}" in result.stderr and html.is_file()


def test_item9_large_batches_are_encoded_in_bounded_chunks(env, images, monkeypatch):
    import capcli.runtime.captioner

    captioner = open_captioner(env["bundle"], "onnx", provider="cpu")
    encoded, stepped = [], []
    start_batch, step = capcli.runtime.captioner.start_batch_classes, captioner.step

    def spy_start(captioner, batch):
        encoded.append(len(batch))
        return start_batch(captioner, batch)

    def spy_step(tokens, state):
        stepped.append(len(tokens))
        return step(tokens, state)

    monkeypatch.setattr(capcli.runtime.captioner, "start_batch_classes", spy_start)
    captioner.step = spy_step
    paths = images[: 2 * ENCODE_CHUNK + 3]
    big = caption_images(captioner, paths, beam_size=1, batch_size=1000)
    assert max(encoded) <= ENCODE_CHUNK and sum(encoded) == len(paths)
    assert max(stepped) == len(paths), "the whole batch is still decoded together"
    captioner.step = step
    one = caption_images(captioner, paths, beam_size=1, batch_size=1)
    assert [r.caption for r in big] == [r.caption for r in one]
    assert [r.score for r in big] == pytest.approx([r.score for r in one], abs=1e-5)


def test_item9_bounded_chunks_keep_failed_images_in_place(env, images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    paths = [*images[:ENCODE_CHUNK - 1], bad, *images[ENCODE_CHUNK - 1: ENCODE_CHUNK + 2]]
    captioner = open_captioner(env["bundle"], "onnx", provider="cpu")
    results = caption_images(captioner, paths, beam_size=2, batch_size=100)
    alone = caption_images(captioner, [p for p in paths if p != bad], beam_size=2, batch_size=1)
    assert [r.image for r in results] == [str(p) for p in paths]
    assert results[ENCODE_CHUNK - 1].error and results[ENCODE_CHUNK - 1].caption is None
    assert [r.caption for r in results if r.error is None] == [r.caption for r in alone]


@pytest.mark.parametrize(("options", "expected"), [
    (["--beams", "4", "--beam-size", "3"], "beam search keeps --beam-size 3"),
    (["--beams", "2", "--beam-size", "1"], "--beam-size 1 is greedy"),
    (["--beams", "2", "--sample"], "--sample gives one caption"),
])
def test_item9_beams_that_cannot_be_given_are_refused(env, images, options, expected):
    line = one_line(run("caption", str(images[0]), "--model", str(env["bundle"]), *options), 2)
    assert "--beams" in line and expected in line
