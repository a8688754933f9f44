"""Issue 19 item 4: a bundle cannot be half-swapped or subtly poisoned.

The encoder's and decoder's own metadata must name the same source checkpoint (read from the graphs, so
deleting source_checkpoint_sha256 from capcli.json does not switch the check off); every file a graph loads
(ONNX external data) must be hashed in the manifest; preprocessing values are range-checked; `io.state` and
`io.context` must name exactly what the graphs take. Each refusal is one error line, never a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import rehash, tiny_checkpoint, tiny_env, tiny_plugin
from typer.testing import CliRunner

from capcli.bundle import manifest as bundle
from capcli.bundle import schema
from capcli.cli import app
from capcli.errors import CapcliError
from capcli.runtime.captioner import open_captioner


def _attention_run(run: Path, dataset: Path) -> Path:
    """An untrained attention decoder on the tiny backbone's grid: an attention bundle in seconds."""
    import torch
    from tiny_backbone import tiny

    from capcli.data.readers import load_dataset
    from capcli.data.text import Vocabulary
    from capcli.model import checkpoint
    from capcli.model.attention import AttentionConfig, AttentionDecoder

    ds = load_dataset(str(dataset), seed=0)
    vocab = Vocabulary.build([c for name in ds.splits["train"] for c in ds.captions[name]], threshold=1)
    torch.manual_seed(0)
    cfg = AttentionConfig(feature_dim=tiny.grid.channels, vocab_size=len(vocab), embed_dim=8, hidden_dim=16,
                          dropout=0.0, context_dim=8, attention_dim=8)
    decoder = AttentionDecoder(cfg)
    with torch.no_grad():
        decoder.out.weight.mul_(20)
    run.mkdir(parents=True)
    train_config = {"dataset": str(dataset), "images": None, "seed": 0, "backbone": "tiny"}
    checkpoint.save(run / "best.pt", {
        "config": cfg.to_dict(), "model": decoder.state_dict(), "vocab": vocab.to_json(), "decoder": "attention",
        "vocab_sha256": vocab.sha256, "backbone": "tiny", "weights": "none", "feature_dim": cfg.feature_dim,
        "preprocessing": tiny.preprocessing.to_dict(), "max_len": 8, "dataset": str(dataset),
        "dataset_fingerprint": None, "train_config": train_config, "epoch": 0, "history": [],
    })
    return run


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    """Bundle A, bundle B (same vocabulary and shapes, another checkpoint) and an attention bundle."""
    from capcli.bundle.build import export

    tmp = tmp_path_factory.mktemp("reliability-bundles")
    with tiny_plugin(tmp / "plugin"):
        made = tiny_env(tmp, small_synthetic)
        other = tiny_checkpoint(tmp / "run-b", small_synthetic, seed=7)
        made["other"] = export(other, tmp / "bundle-b", exporter="torchscript")
        made["attention"] = export(_attention_run(tmp / "run-att", small_synthetic), tmp / "bundle-att",
                                   exporter="torchscript")
        yield made


@pytest.fixture
def image(small_synthetic) -> Path:
    return sorted((small_synthetic / "Images").glob("*.jpg"))[0]


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _meta(folder: Path) -> dict:
    return json.loads((folder / bundle.MANIFEST).read_text())


def _write(folder: Path, meta: dict) -> None:
    (folder / bundle.MANIFEST).write_text(json.dumps(meta))


def _refused(folder: Path, image: Path, expected: str) -> str:
    """Refused by the API with `expected` in the message, and by the CLI as one error line, exit 1."""
    with pytest.raises(CapcliError, match=expected):
        open_captioner(folder, "onnx", provider="cpu")
    result = CliRunner().invoke(app, ["caption", str(image), "--model", str(folder), "--provider", "cpu"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _drop_graph_key(path: Path, key: str) -> None:
    import onnx

    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    for k, v in kept:
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


# --- the graphs name one source checkpoint -----------------------------------------------------------------


def test_both_bundles_open_as_exported(env):
    for name in ("bundle", "other", "attention"):
        assert open_captioner(env[name], "onnx", provider="cpu").meta["files"]["decoder"] == "decoder.onnx"


@pytest.mark.parametrize("keep_manifest_key", [False, True])
def test_a_decoder_from_another_checkpoint_is_refused_even_without_the_manifest_key(
        env, tmp_path, image, keep_manifest_key):
    """Same vocabulary, same shapes, rehashed: only the graphs' own metadata tells the checkpoints apart."""
    folder = _copy(env["bundle"], tmp_path / "b")
    shutil.copy(env["other"] / "decoder.onnx", folder / "decoder.onnx")
    meta = rehash(folder)
    if not keep_manifest_key:
        del meta["source_checkpoint_sha256"]
        _write(folder, meta)
    line = _refused(folder, image, "half-swapped")
    assert "encoder.onnx and decoder.onnx were exported from different checkpoints" in line


def test_a_half_swapped_encoder_is_refused_too(env, tmp_path, image):
    folder = _copy(env["bundle"], tmp_path / "b")
    shutil.copy(env["other"] / "encoder.onnx", folder / "encoder.onnx")
    meta = rehash(folder)
    meta.pop("source_checkpoint_sha256")
    _write(folder, meta)
    _refused(folder, image, "different checkpoints")


def test_graphs_that_name_no_source_checkpoint_are_refused_with_what_to_do(env, tmp_path, image):
    """Formats 2 and 3 always stamped it: a graph without it is older or altered, and re-exporting fixes it."""
    folder = _copy(env["bundle"], tmp_path / "b")
    for name in ("encoder.onnx", "decoder.onnx"):
        _drop_graph_key(folder / name, schema.GRAPH_MODEL_KEY)
    meta = rehash(folder)
    meta.pop("source_checkpoint_sha256")
    _write(folder, meta)
    line = _refused(folder, image, "names no source checkpoint")
    assert "export the run again" in line


# --- every file a graph loads is hashed --------------------------------------------------------------------


def _to_external_data(path: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def test_external_data_not_in_the_manifest_is_refused(env, tmp_path, image):
    folder = _copy(env["bundle"], tmp_path / "b")
    _to_external_data(folder / "decoder.onnx", "decoder.weights")
    rehash(folder)  # decoder.onnx rehashed; decoder.weights, which it now loads, is not hashed
    line = _refused(folder, image, "decoder.weights, which capcli.json does not hash")
    assert "decoder.onnx loads external data" in line


def test_external_data_in_the_manifest_opens_and_is_verified(env, tmp_path, image):
    folder = _copy(env["bundle"], tmp_path / "b")
    _to_external_data(folder / "decoder.onnx", "decoder.weights")
    meta = rehash(folder)
    meta["sha256"]["decoder.weights"] = bundle.sha256_file(folder / "decoder.weights")
    _write(folder, meta)
    open_captioner(folder, "onnx", provider="cpu")
    data = bytearray((folder / "decoder.weights").read_bytes())
    data[-1] ^= 1  # one weight changed: the hash now tells
    (folder / "decoder.weights").write_bytes(bytes(data))
    _refused(folder, image, "sha256 of decoder.weights does not match")


def test_external_data_outside_the_bundle_is_refused(env, tmp_path, image):
    folder = _copy(env["bundle"], tmp_path / "b")
    _to_external_data(folder / "decoder.onnx", "decoder.weights")
    import onnx

    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../decoder.weights"
    onnx.save(model, str(folder / "decoder.onnx"))
    shutil.move(folder / "decoder.weights", tmp_path / "decoder.weights")
    rehash(folder)
    _refused(folder, image, "must be a plain file name inside the bundle")


def test_a_graph_that_is_not_protobuf_is_one_line(env, tmp_path, image):
    folder = _copy(env["bundle"], tmp_path / "b")
    (folder / "decoder.onnx").write_bytes(b"\xff" * 12)
    rehash(folder)
    _refused(folder, image, "decoder.onnx is not a readable ONNX graph")


# --- preprocessing values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("std", [0.229, 1e-9, 0.225], "'preprocessing.std' must be a list of 3 numbers from 0.001 to 10"),
    ("std", [0.229, 1e6, 0.225], "'preprocessing.std' must be a list of 3 numbers from 0.001 to 10"),
    ("mean", [0.485, 300.0, 0.406], "'preprocessing.mean' must be a list of 3 numbers from 0 to 1"),
    ("mean", [-5.0, 0.456, 0.406], "'preprocessing.mean' must be a list of 3 numbers from 0 to 1"),
    ("resize", 16, r"'preprocessing.resize' must be from input_size \(32\)"),
    ("resize", 4000, r"'preprocessing.resize' must be from input_size \(32\) to 4 times it \(128\)"),
])
def test_preprocessing_out_of_range_is_one_error_naming_the_key(env, tmp_path, image, key, value, expected):
    folder = _copy(env["bundle"], tmp_path / "b")
    meta = _meta(folder)
    meta["preprocessing"][key] = value
    _write(folder, meta)
    _refused(folder, image, expected)


@pytest.mark.parametrize("text", ['[0.229, NaN, 0.225]', '[0.229, Infinity, 0.225]', '[0.229, -0.1, 0.225]'])
def test_std_that_is_not_finite_and_positive_is_refused(env, tmp_path, image, text):
    folder = _copy(env["bundle"], tmp_path / "b")
    meta = _meta(folder)
    meta["preprocessing"]["std"] = "@STD@"
    (folder / bundle.MANIFEST).write_text(json.dumps(meta).replace('"@STD@"', text))
    _refused(folder, image, "'preprocessing.std' must be a list of 3")


def test_the_bounds_hold_for_every_shipped_backbone():
    from capcli.registry import get_backbone

    for name in ("efficientnet_lite0", "resnet152", "inceptionv3", "vgg16"):
        prep = get_backbone(name).preprocessing.to_dict()
        meta_like = {"preprocessing": prep}
        for key, check, _ in schema.SCHEMA:
            if key.startswith("preprocessing."):
                assert check(schema._lookup(meta_like, key)) is None, (name, key)
        assert prep["input_size"] <= prep["resize"] <= schema.MAX_RESIZE_RATIO * prep["input_size"]


# --- io.state and io.context name exactly what the graphs take ---------------------------------------------


@pytest.mark.parametrize(("which", "key", "names"), [
    ("bundle", "state", ["h", "x"]),
    ("bundle", "state", ["h"]),
    ("bundle", "state", ["h", "c", "c"]),
    ("attention", "context", ["grid", "features"]),
    ("attention", "context", ["grid"]),
    ("attention", "context", ["grid", "projection", "extra"]),
    ("attention", "state", ["hidden", "cell"]),
])
def test_io_names_other_than_the_graphs_take_are_one_line(env, tmp_path, image, which, key, names):
    folder = _copy(env[which], tmp_path / "b")
    meta = _meta(folder)
    meta.setdefault("io", {})[key] = names
    _write(folder, meta)
    line = _refused(folder, image, f"'io.{key}'")
    assert "KeyError" not in line


def test_io_order_does_not_matter(env, tmp_path):
    folder = _copy(env["attention"], tmp_path / "b")
    meta = _meta(folder)
    meta["io"]["context"] = ["projection", "grid"]
    _write(folder, meta)
    captioner = open_captioner(folder, "onnx", provider="cpu")
    assert captioner.context_names == ["projection", "grid"]


def test_a_decoder_whose_inputs_are_not_the_ones_io_names_is_one_line(env, tmp_path, image):
    """Graph inputs renamed (the manifest untouched): the names are compared with the graph's own."""
    import onnx

    folder = _copy(env["bundle"], tmp_path / "b")
    model = onnx.load(str(folder / "decoder.onnx"))
    for value in model.graph.input:
        if value.name == "c":
            value.name = "cell"
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == "c":
                node.input[i] = "cell"
    onnx.save(model, str(folder / "decoder.onnx"))
    rehash(folder)
    line = _refused(folder, image, "decoder.onnx has inputs")
    assert "'cell'" in line and "'io' implies" in line


@pytest.mark.parametrize("resize", [8, 100_000])
def test_export_refuses_a_backbone_whose_resize_no_bundle_could_hold(env, tmp_path, monkeypatch, resize):
    import dataclasses

    import capcli.registry
    from capcli.backbone import Preprocessing
    from capcli.bundle.build import export

    real = capcli.registry.get_backbone

    def odd_resize(name):
        spec = real(name)
        prep = spec.preprocessing
        return dataclasses.replace(spec, preprocessing=Preprocessing(prep.input_size, resize, prep.mean, prep.std))

    monkeypatch.setattr(capcli.registry, "get_backbone", odd_resize)
    run = Path(json.loads((env["bundle"] / "capcli.json").read_text())["source_checkpoint"])
    with pytest.raises(CapcliError, match=r"cannot be exported: 'preprocessing.resize'") as refused:
        export(run, tmp_path / "out", exporter="torchscript")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
