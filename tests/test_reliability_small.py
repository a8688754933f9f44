"""The smaller ones of issue 19 item 8, outside the server: plugins that cannot silence capcli, CAPCLI_PLUGINS
typos said, and accurate one-line messages for odd manifest and graph files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from tiny_models import tiny_checkpoint, tiny_plugin
from typer.testing import CliRunner

from capcli.bundle import manifest as bundle
from capcli.bundle import schema
from capcli.bundle.build import export
from capcli.cli import app
from capcli.errors import CapcliError


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("small")
    with tiny_plugin(tmp / "plugin"):
        yield export(tiny_checkpoint(tmp / "run", small_synthetic), tmp / "bundle", exporter="torchscript")


def _exiting_plugin(folder):
    folder.mkdir()
    (folder / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    info = folder / "capcli_exiting-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: capcli-exiting\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[capcli.backbones]\nexiting = exiting_plugin:backbone\n")


@pytest.mark.parametrize("command", [["backbones", "--json"], ["doctor", "--json"]])
def test_a_plugin_calling_sys_exit_cannot_silence_capcli(tmp_path, command):
    _exiting_plugin(tmp_path / "plugin")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "plugin")}
    env.pop("CAPCLI_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "capcli", *command], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout and "SystemExit" in proc.stdout, proc.stdout


def test_capcli_plugins_naming_nothing_installed_is_said(monkeypatch):
    monkeypatch.setenv("CAPCLI_PLUGINS", "bogus")
    result = CliRunner().invoke(app, ["backbones"])
    assert result.exit_code == 0
    assert "CAPCLI_PLUGINS names 'bogus'" in result.stderr, result.stderr
    from capcli.registry import get_backbone

    with pytest.raises(CapcliError, match="CAPCLI_PLUGINS"):
        get_backbone("efficientnet_lite0")


def _copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b")


def test_an_oversized_manifest_is_refused_unread(tiny_bundle, tmp_path, monkeypatch):
    folder = _copy(tiny_bundle, tmp_path)
    with open(folder / bundle.MANIFEST, "ab") as f:
        f.write(b" " * (schema.MAX_MANIFEST_BYTES + 1))
    monkeypatch.setattr(bundle.Path, "read_text", lambda *_a, **_k: pytest.fail("read before its size was checked"))
    with pytest.raises(CapcliError, match="refused unread"):
        bundle.read_manifest(folder)


def test_a_fifo_manifest_is_refused_without_hanging(tiny_bundle, tmp_path):
    folder = _copy(tiny_bundle, tmp_path)
    (folder / bundle.MANIFEST).unlink()
    os.mkfifo(folder / bundle.MANIFEST)
    with pytest.raises(CapcliError, match="not a regular file"):
        bundle.read_manifest(folder)


def test_a_symlink_loop_manifest_is_named(tiny_bundle, tmp_path):
    folder = _copy(tiny_bundle, tmp_path)
    (folder / bundle.MANIFEST).unlink()
    os.symlink(bundle.MANIFEST, folder / bundle.MANIFEST)
    with pytest.raises(CapcliError, match="cannot read .*(symbolic links|loop)"):
        bundle.read_manifest(folder)


def test_a_folder_named_like_a_graph_is_named(tiny_bundle, tmp_path):
    folder = _copy(tiny_bundle, tmp_path)
    (folder / "encoder.onnx").unlink()
    (folder / "encoder.onnx").mkdir()
    with pytest.raises(CapcliError, match="encoder.onnx is a folder, not a file"):
        bundle.read_manifest(folder)
