"""Issue 29 item 9: with `./exported/flickr8k` broken (no capcli.json), `capcli caption photo --json` used the
checkout's bundle without a word. Now a command given no model names the one that answers (stderr), and warns
about a broken ./exported/flickr8k it passed over."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_reliability_manifest import invoke

ROOT = Path(__file__).parents[1]
PHOTO = ROOT / "tests" / "images" / "chelsea.jpg"


@pytest.mark.parametrize("command", ["caption", "serve"])
def test_a_broken_shipped_bundle_here_is_warned_about_and_the_model_used_named(tmp_path, monkeypatch, command):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    broken = tmp_path / "exported" / "flickr8k"
    broken.mkdir(parents=True)
    (broken / "encoder.onnx").write_bytes(b"half a bundle")
    monkeypatch.chdir(tmp_path)
    result = invoke(command, *([PHOTO, "--json"] if command == "caption" else ["--port", "0"]))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "exported/flickr8k" in warnings[0] and "capcli.json" in warnings[0], result.stderr
    shipped = str(ROOT / "exported" / "flickr8k")
    assert shipped in result.stderr + result.stdout  # the model that answers


def test_caption_names_the_shipped_model_it_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("caption", PHOTO, "--json")
    assert result.exit_code == 0, result.output
    assert f"model: {ROOT / 'exported' / 'flickr8k'}" in result.stderr
    assert "warning" not in result.stderr
