"""Issue 29 items 8 and 10: what a bundle says about itself.

8. capcli.json records how the checkpoint was trained (`training`: the stage, cross-entropy or scst, its epoch
   and validation scores), for every export; bundles without it still load.
10. A bundle's integrity: every file but capcli.json is hashed in capcli.json and refused when altered; capcli.json
   itself carries `manifest_sha256` (its content without that key), so an edit within the schema (max_len 2:
   "a girl is standing on a white and blue blanket" became "a girl") is warned about on load and reported by
   `capcli inspect BUNDLE`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import tiny_checkpoint, tiny_plugin
from typer.testing import CliRunner

from capcli.bundle.build import export
from capcli.bundle.manifest import MANIFEST, read_manifest
from capcli.cli import app
from capcli.model import checkpoint

ROOT = Path(__file__).parents[1]
PHOTO = ROOT / "tests" / "images" / "chelsea.jpg"


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("manifest")
    with tiny_plugin(tmp / "plugin"):
        run = tiny_checkpoint(tmp / "run", small_synthetic)
        ckpt = checkpoint.load(run / "best.pt")
        ckpt["epoch"] = 2
        ckpt["history"] = [{"epoch": e, "val_loss": 3.0 - e / 10, "val_bleu4": 10.0 + e, "val_cider": 20.0 + e,
                            "best": e == 3} for e in (1, 2, 3)]
        ckpt["train_config"] |= {"epochs": 5, "select_on": "cider"}
        checkpoint.save(run / "best.pt", ckpt)
        scst_run = Path(shutil.copytree(run, tmp / "scst-run"))
        ckpt |= {"stage": "scst", "scst": {"epoch": 2, "val_bleu4": 14.5, "val_cider": 26.25, "val_distinct": 80.0,
                                          "val_words": 9.5, "ref_words": 10.9,
                                          "config": {"epochs": 4, "baseline": "mean", "samples": 5, "lr": 5e-05}}}
        checkpoint.save(scst_run / "best.pt", ckpt)
        yield {"run": run, "bundle": export(run, tmp / "bundle", exporter="torchscript"),
               "scst_bundle": export(scst_run, tmp / "scst-bundle", exporter="torchscript"), "data": small_synthetic,
               "tmp": tmp}


@pytest.fixture
def bundle(env, tmp_path) -> Path:
    """A copy of the cross-entropy bundle, to alter."""
    return Path(shutil.copytree(env["bundle"], tmp_path / "bundle"))


def edit_manifest(bundle: Path, **changes) -> None:
    meta = json.loads((bundle / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (bundle / MANIFEST).write_text(json.dumps(meta, indent=2))


# --- item 8 -------------------------------------------------------------------------------------------------------


def test_a_cross_entropy_export_records_its_training(env):
    training = read_manifest(env["bundle"])["training"]
    assert training == {"stage": "cross-entropy",
                        "cross_entropy": {"epoch": 3, "epochs": 5, "select_on": "cider",
                                          "val": {"loss": 2.7, "bleu4": 13.0, "cider": 23.0}}}


def test_an_export_after_scst_says_so(env):
    training = read_manifest(env["scst_bundle"])["training"]
    assert training["stage"] == "scst"
    assert training["scst"] == {"epoch": 2, "epochs": 4, "baseline": "mean", "samples": 5, "lr": 5e-05,
                                "val": {"bleu4": 14.5, "cider": 26.25, "distinct": 80.0, "words": 9.5}}
    assert training["cross_entropy"]["epoch"] == 3  # the model SCST started from


def test_a_bundle_without_training_still_loads_and_captions(bundle):
    edit_manifest(bundle, training=None, manifest_sha256=None)  # as exported before either existed
    assert "training" not in read_manifest(bundle)
    result = invoke("caption", PHOTO, "--model", bundle, "--json")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr


def test_a_training_section_that_breaks_the_schema_is_one_line(bundle):
    edit_manifest(bundle, training={"stage": "magic"})
    result = invoke("caption", PHOTO, "--model", bundle)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "'training.stage'" in lines[0], result.stderr


# --- item 10 ------------------------------------------------------------------------------------------------------


def test_inspect_says_a_bundle_is_as_exported(env):
    result = invoke("inspect", env["scst_bundle"])
    assert result.exit_code == 0, result.output
    assert "as export wrote it" in result.stdout and "scst" in result.stdout
    data = json.loads(invoke("inspect", env["scst_bundle"], "--json").stdout)
    assert data["intact"] is True and data["manifest"] == "as exported" and data["training"]["stage"] == "scst"
    assert set(data["files"]) == {"encoder.onnx", "decoder.onnx", "vocab.json"}
    assert set(data["files"].values()) == {"ok"}


def test_an_edit_within_the_schema_is_warned_on_load_and_reported_by_inspect(bundle):
    """Before: max_len 2 turned a caption into its first two words, silently."""
    edit_manifest(bundle, max_len=2)
    result = invoke("caption", PHOTO, "--model", bundle, "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "capcli.json" in warnings[0] and "differs from what" in warnings[0], result.stderr
    report = invoke("inspect", bundle)
    assert report.exit_code == 1
    assert "capcli.json differs from what export wrote" in report.stdout


def test_inspect_names_an_altered_file(bundle):
    with open(bundle / "vocab.json", "a") as f:
        f.write(" ")
    report = invoke("inspect", bundle, "--json")
    assert report.exit_code == 1
    data = json.loads(report.stdout)
    assert data["intact"] is False and data["files"]["vocab.json"] == "altered"


def test_inspect_of_a_folder_that_is_no_bundle_is_one_line(tmp_path):
    result = invoke("inspect", tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "not a capcli bundle" in lines[0], result.stderr


def test_inspect_reads_an_older_bundle_without_a_manifest_hash(bundle):
    edit_manifest(bundle, manifest_sha256=None)
    result = invoke("inspect", bundle, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["manifest"] == "not recorded"


def test_a_quantized_bundle_is_sealed_as_quantize_left_it(env, tmp_path):
    with tiny_plugin(tmp_path / "plugin"):
        out = export(env["run"], tmp_path / "f16", exporter="torchscript", quantize="float16")
    data = json.loads(invoke("inspect", out, "--json").stdout)
    assert data["manifest"] == "as exported" and data["intact"] is True
