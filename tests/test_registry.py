"""The plugin registry as a third-party author meets it: a throwaway distribution, broken plugins,
CAPCLI_PLUGINS, the `capcli backbones` command, and a torch-free listing in a fresh interpreter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.cli import app
from capcli.errors import CapcliError
from capcli.registry import get_backbone, list_backbones, plugins
from capcli.testing import check_backbone

FAKE_SOURCES = Path(__file__).parent / "fake_plugin"
FAKE_MODULES = ("capcli_fakebackbone", "capcli_brokenbackbone")
REAL = {"vgg16": 4096, "inceptionv3": 2048, "resnet152": 2048, "efficientnet_lite0": 1280}

ENTRY_POINTS = """\
[capcli.backbones]
fake = capcli_fakebackbone:backbone
fakebroken = capcli_brokenbackbone:backbone
fakewrongtype = capcli_fakebackbone:not_a_backbone
"""


@pytest.fixture(autouse=True)
def _all_plugins(monkeypatch):
    monkeypatch.delenv("CAPCLI_PLUGINS", raising=False)


@pytest.fixture
def fake_dist(tmp_path, monkeypatch) -> Iterator[Path]:
    """An installed-looking distribution `capcli-fakebackbone 0.0.1` on sys.path, without pip."""
    for module in FAKE_MODULES:
        shutil.copy(FAKE_SOURCES / f"{module}.py", tmp_path)
    info = tmp_path / "capcli_fakebackbone-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: capcli-fakebackbone\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    for module in FAKE_MODULES:  # a module cached by an earlier test would hide this folder's copy
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in FAKE_MODULES:
        sys.modules.pop(module, None)


def _by_name() -> dict:
    return {p.name: p for p in plugins()}


def test_fake_distribution_is_listed_with_its_metadata(fake_dist):
    fake = _by_name()["fake"]
    assert (fake.distribution, fake.version, fake.error) == ("capcli-fakebackbone", "0.0.1", None)
    assert fake.backbone is not None and fake.backbone.feature_dim == 8


def test_fake_backbone_passes_the_contract_check(fake_dist):
    backbone = get_backbone("fake")
    check_backbone(backbone, batch_size=3)
    assert backbone in list_backbones()


def test_broken_plugins_are_reported_and_the_others_still_load(fake_dist):
    found = _by_name()
    assert "ImportError" in found["fakebroken"].error
    assert "a_missing_dependency" in found["fakebroken"].error
    assert "not capcli.backbone.Backbone" in found["fakewrongtype"].error
    assert found["fakebroken"].backbone is None and found["fakewrongtype"].backbone is None
    loaded = {b.name for b in list_backbones()}
    assert {"fake", *REAL} <= loaded
    with pytest.raises(CapcliError, match="fakebroken' is installed but failed to load: ImportError"):
        get_backbone("fakebroken")


def test_unknown_backbone_names_the_available_ones(fake_dist):
    with pytest.raises(CapcliError) as info:
        get_backbone("x")
    message = str(info.value)
    assert message.startswith("unknown backbone 'x'; available: ")
    assert "fake" in message and "resnet152" in message
    assert "fakebroken" not in message  # only backbones that loaded are offered


def test_capcli_plugins_restricts_what_is_loaded(fake_dist, monkeypatch):
    monkeypatch.setenv("CAPCLI_PLUGINS", "")
    assert plugins() == []
    monkeypatch.setenv("CAPCLI_PLUGINS", "fake")
    assert [p.name for p in plugins()] == ["fake"]
    with pytest.raises(CapcliError, match="available: fake$"):
        get_backbone("resnet152")


def test_capcli_plugins_naming_nothing_installed_says_so(fake_dist, monkeypatch):
    monkeypatch.setenv("CAPCLI_PLUGINS", "fake,bogus")
    result = CliRunner().invoke(app, ["backbones"])
    assert result.exit_code == 0, result.output
    assert "CAPCLI_PLUGINS names 'bogus', which no installed backbone plugin provides" in result.stderr
    assert "'fake'" not in result.stderr


def test_backbones_json_lists_fake_and_broken(fake_dist):
    result = CliRunner().invoke(app, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["fake"] == {
        "name": "fake",
        "feature_dim": 8,
        "input_size": 32,
        "grid": None,  # no grid declared: pooled decoder only
        "weights": "random only",
        "distribution": "capcli-fakebackbone",
        "version": "0.0.1",
    }
    assert "ImportError" in rows["fakebroken"]["error"] and rows["fakebroken"]["feature_dim"] is None
    assert {name: rows[name]["feature_dim"] for name in REAL} == REAL
    assert rows["vgg16"]["grid"] == [512, 14, 14] and rows["efficientnet_lite0"]["grid"] == [1280, 7, 7]


def test_backbones_table_shows_the_broken_plugin(fake_dist, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables to the terminal width
    result = CliRunner().invoke(app, ["backbones"])
    assert result.exit_code == 0, result.output
    assert "fakebroken" in result.stdout and "failed to load" in result.stdout
    assert "512x14x14" in result.stdout and "none (pooled only)" in result.stdout


# --- a fresh interpreter: listing plugins must not import torch -----------------------------------

_RUN_CLI = """
import sys
import capcli.cli
sys.argv = ["capcli", *sys.argv[1:]]
try:
    capcli.cli.main()
except SystemExit as exc:
    code = exc.code
print(f"\\n@@ exit={code} torch={'torch' in sys.modules}", file=sys.stderr)
"""


def _run_cli(*args: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CAPCLI_PLUGINS"}
    env["COLUMNS"] = "200"  # rich wraps tables to the terminal width
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["backbones"], ["backbones", "--json"]], ids=" ".join)
def test_cli_listing_does_not_import_torch(args):
    stdout, stderr = _run_cli(*args)
    assert "@@ exit=0 torch=False" in stderr, stderr
    if args == ["backbones", "--json"]:
        rows = {row["name"]: row for row in json.loads(stdout)}
        assert {name: rows[name]["feature_dim"] for name in REAL} == REAL
        assert all("error" not in rows[name] for name in REAL)
    elif args == ["backbones"]:
        assert all(name in stdout for name in REAL)
