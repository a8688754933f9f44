"""Issue 9 item 2: a bundle's checks cannot be bypassed.

Every file is hashed and inside the folder, the manifest follows one schema (one clear error naming the key),
the graphs' shapes and capcli metadata must fit the manifest, vocab.json must be the model's, and
`--runtime torch` must find the very checkpoint the bundle was exported from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import export_step, rehash, tiny_env, tiny_plugin
from typer.testing import CliRunner

from capcli.bundle import manifest as bundle
from capcli.bundle import schema
from capcli.cli import app
from capcli.errors import CapcliError
from capcli.runtime.captioner import open_captioner


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("bundle-checks")
    with tiny_plugin(tmp / "plugin"):
        yield tiny_env(tmp, small_synthetic)


@pytest.fixture
def copy(env, tmp_path) -> Path:
    target = tmp_path / "b"
    shutil.copytree(env["bundle"], target)
    return target


def _meta(folder: Path) -> dict:
    return json.loads((folder / bundle.MANIFEST).read_text())


def _write(folder: Path, meta) -> None:
    (folder / bundle.MANIFEST).write_text(json.dumps(meta))


def _stamp_like(path: Path, source: Path) -> None:
    """Copy a bundle graph's capcli metadata onto a foreign graph: the most careful mix-up."""
    import onnx

    model, stamped = onnx.load(str(path)), onnx.load(str(source))
    for prop in stamped.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, str(path))


def one_line_cli_error(folder: Path, image: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["caption", str(image), "--model", str(folder), *extra])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_item2_the_bundle_as_exported_opens(env, small_synthetic):
    captioner = open_captioner(env["bundle"], "onnx", provider="cpu")
    assert captioner.vocab.sha256 == _meta(env["bundle"])["vocab_sha256"]


@pytest.mark.parametrize(("extra_words", "hidden", "stamp", "expected"), [
    (5, 16, True, "vocabulary"),  # other vocabulary size, even with this bundle's metadata copied in
    (0, 32, True, "hidden 16"),  # other hidden size
    (0, 16, False, "carries no capcli metadata"),  # same shapes, not exported with this bundle
])
def test_item2_decoder_from_another_model_with_its_sha256_updated_is_refused(
        env, copy, small_synthetic, extra_words, hidden, stamp, expected):
    vocab_size = _meta(copy)["vocab_size"] + extra_words
    export_step(copy / "decoder.onnx", vocab_size, hidden_dim=hidden)
    if stamp:
        _stamp_like(copy / "decoder.onnx", env["bundle"] / "decoder.onnx")
    rehash(copy)
    with pytest.raises(CapcliError, match=expected):
        open_captioner(copy, "onnx", provider="cpu")
    image = sorted((small_synthetic / "Images").glob("*.jpg"))[0]
    assert "decoder.onnx" in one_line_cli_error(copy, image, "--provider", "cpu")


def test_item2_graph_exported_with_another_vocabulary_is_refused(env, copy):
    import onnx

    model = onnx.load(str(copy / "decoder.onnx"))
    for prop in model.metadata_props:
        if prop.key == schema.GRAPH_VOCAB_KEY:
            prop.value = "0" * 64
    onnx.save(model, str(copy / "decoder.onnx"))
    rehash(copy)
    with pytest.raises(CapcliError, match="another vocabulary"):
        open_captioner(copy, "onnx", provider="cpu")


@pytest.mark.parametrize(("key", "value", "expected"), [
    (("preprocessing", "input_size"), 64, "image size 64"),
    (("decoder", "num_layers"), 2, "layers 2"),
    (("decoder", "hidden_dim"), 8, "hidden 8"),
])
def test_item2_graph_shapes_are_checked_against_the_manifest(copy, key, value, expected):
    meta = _meta(copy)
    meta[key[0]][key[1]] = value
    _write(copy, meta)
    with pytest.raises(CapcliError, match=expected):
        open_captioner(copy, "onnx", provider="cpu")


def test_item2_vocab_json_of_another_model_is_refused(env, copy):
    vocab = json.loads((copy / "vocab.json").read_text())
    vocab["itos"][-1], vocab["itos"][-2] = vocab["itos"][-2], vocab["itos"][-1]  # same size, other words
    (copy / "vocab.json").write_text(json.dumps(vocab))
    rehash(copy)
    with pytest.raises(CapcliError, match="not the vocabulary the model was exported with"):
        open_captioner(copy, "onnx", provider="cpu")


def test_item2_every_file_named_must_be_hashed(copy):
    meta = _meta(copy)
    del meta["sha256"]["decoder.onnx"]
    _write(copy, meta)
    with pytest.raises(CapcliError, match="'sha256' has no entry for decoder.onnx"):
        open_captioner(copy, "onnx", provider="cpu")


@pytest.mark.parametrize("name", ["../elsewhere.onnx", "/tmp/elsewhere.onnx", "sub/decoder.onnx", "..", ""])
def test_item2_files_outside_the_bundle_are_refused(copy, name):
    outside = copy.parent / "elsewhere.onnx"
    shutil.copy(copy / "decoder.onnx", outside)
    meta = _meta(copy)
    meta["files"]["decoder"] = name
    meta["sha256"][name] = meta["sha256"]["decoder.onnx"]
    _write(copy, meta)
    with pytest.raises(CapcliError, match="'files.decoder'|'sha256' entry"):
        open_captioner(copy, "onnx", provider="cpu")


def test_item2_a_symlink_out_of_the_bundle_is_refused(copy):
    outside = copy.parent / "elsewhere.onnx"
    (copy / "decoder.onnx").rename(outside)
    (copy / "decoder.onnx").symlink_to(outside)
    with pytest.raises(CapcliError, match="points outside the bundle"):
        open_captioner(copy, "onnx", provider="cpu")


REQUIRED = [key for key, _, required in schema.SCHEMA if required]


@pytest.mark.parametrize("key", REQUIRED)
def test_item2_each_missing_key_is_one_error_naming_it(copy, key):
    meta = _meta(copy)
    *parents, last = key.split(".")
    node = meta
    for part in parents:
        node = node[part]
    del node[last]
    _write(copy, meta)
    with pytest.raises(schema.ManifestError, match=f"'{key}' is missing"):
        open_captioner(copy, "onnx", provider="cpu")


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda m: m["preprocessing"].update(interpolation="lanczos"), "'preprocessing.interpolation' must be one of"),
    (lambda m: m.update(max_len=0), "'max_len' must be from 1"),
    (lambda m: m.update(max_len=True), "'max_len' must be an integer"),
    (lambda m: m.update(vocab_size="12"), "'vocab_size' must be an integer"),
    (lambda m: m["special_tokens"].update(end=10_000), "'special_tokens.end' must be below vocab_size"),
    (lambda m: m["preprocessing"].update(std=[0.2, 0, 0.2]), "'preprocessing.std' must be a list of 3 positive"),
    (lambda m: m["preprocessing"].update(mean="0.5"), "'preprocessing.mean' must be a list of 3 numbers"),
    (lambda m: m["preprocessing"].update(input_size=10**9), "'preprocessing.input_size' must be from 1 to"),
    (lambda m: m.update(files=["encoder.onnx"]), "'files' must be an object"),
    (lambda m: m.update(preprocessing=None), "'preprocessing' must be an object"),
    (lambda m: m["sha256"].update({"decoder.onnx": "abc"}), "'sha256' entry 'decoder.onnx' must be a sha256"),
    (lambda m: m.update(vocab_sha256=None), "'vocab_sha256' must be a sha256"),
])
def test_item2_malformed_values_are_one_error_naming_the_key(copy, edit, expected):
    meta = _meta(copy)
    edit(meta)
    _write(copy, meta)
    with pytest.raises(schema.ManifestError, match=expected):
        open_captioner(copy, "onnx", provider="cpu")


@pytest.mark.parametrize("text", ["[]", "[1, 2]", '"capcli"', "null", "{", "\xff"])
def test_item2_a_manifest_that_is_not_an_object_is_one_error(copy, text, small_synthetic):
    (copy / bundle.MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(schema.ManifestError):
        open_captioner(copy, "onnx", provider="cpu")
    image = sorted((small_synthetic / "Images").glob("*.jpg"))[0]
    assert "capcli.json" in one_line_cli_error(copy, image)


def test_item2_torch_runtime_verifies_the_source_checkpoint(env, copy, tmp_path, small_synthetic):
    import torch

    image = sorted((small_synthetic / "Images").glob("*.jpg"))[0]
    assert open_captioner(copy, "torch").checkpoint["backbone"] == "tiny"  # the untouched source: accepted
    retrained = tmp_path / "retrained.pt"
    ckpt = torch.load(env["run"] / "best.pt", weights_only=True)
    ckpt["model"]["out.bias"] += 1.0  # trained further after the export
    torch.save(ckpt, retrained)
    meta = _meta(copy)
    meta["source_checkpoint"] = str(retrained)
    _write(copy, meta)
    with pytest.raises(CapcliError, match="not the checkpoint the bundle was exported from"):
        open_captioner(copy, "torch")
    assert "sha256 differs" in one_line_cli_error(copy, image, "--runtime", "torch")
    del meta["source_checkpoint_sha256"]
    _write(copy, meta)
    with pytest.raises(CapcliError, match="cannot be verified"):
        open_captioner(copy, "torch")
