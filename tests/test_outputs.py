"""Where outputs go and how they are written.

Issue 9 item 5 (files and folders honour the umask), item 6 (export --force replaces only export's own files,
atomically, manifest last), item 10 (operating-system errors are one line, nothing written is corrupted) and
the exporter part of item 11 (the dynamo exporter, chosen deliberately, quiet fallback).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from mounts import fill, read_only, small_disk
from tiny_models import tiny_checkpoint, tiny_plugin
from typer.testing import CliRunner

from capcli.bundle import manifest as bundle
from capcli.bundle.build import export
from capcli.cli import app
from capcli.errors import CapcliError
from capcli.runtime.captioner import open_captioner

UMASK = 0o027  # gives 0o640 / 0o750: neither mkstemp's 0o600 nor the usual 0o644


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("outputs")
    with tiny_plugin(tmp / "plugin"):
        run = tiny_checkpoint(tmp / "run", small_synthetic)
        yield {"run": run, "bundle": export(run, tmp / "bundle", exporter="torchscript"), "data": small_synthetic}


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- item 5: the umask ---------------------------------------------------------------------------------------


def test_item5_exported_bundle_honours_the_umask(env, tmp_path, umask):
    out = export(env["run"], tmp_path / "bundle", exporter="torchscript")
    assert mode(out) == 0o777 & ~umask
    for path in out.iterdir():
        assert mode(path) == 0o666 & ~umask, path.name


def test_item5_dataset_run_and_reports_honour_the_umask(env, tmp_path, umask):
    from capcli.data.synthetic import build
    from capcli.report import write_html
    from capcli.train.config import TrainConfig
    from capcli.train.loop import train

    data = build(tmp_path / "data", n_images=12, seed=3)
    assert mode(data) == 0o777 & ~umask and mode(data / "Images") == 0o777 & ~umask
    for name in ("captions.txt", "objects.json"):
        assert mode(data / name) == 0o666 & ~umask, name
    run = train(TrainConfig(backbone="tiny", dataset=str(env["data"]), weights="none", out=str(tmp_path / "run"),
                            epochs=1, batch_size=64, embed_dim=8, hidden_dim=8, threshold=2, val_sample=4,
                            device="cpu", workers=0), show_progress=False)
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "best.pt"):
        assert mode(run / name) == 0o666 & ~umask, name
    report = write_html(tmp_path / "r.html", [{"image": "x.png", "caption": "a", "score": 0.0}])
    assert mode(report) == 0o666 & ~umask


# --- item 6: export --force ------------------------------------------------------------------------------------


def test_item6_export_force_keeps_the_users_files(env, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(env["bundle"], target)
    (target / "notes.md").write_text("my notes\n")
    (target / "evaluation-test.json").write_text('{"scores": {}}\n')
    (target / "plots").mkdir()
    (target / "plots" / "curve.png").write_bytes(b"png")
    # A file an earlier export wrote and this one does not (external data, say): export's own, so removed.
    (target / "encoder.onnx.data").write_bytes(b"old weights")
    meta = json.loads((target / bundle.MANIFEST).read_text())
    meta["sha256"]["encoder.onnx.data"] = bundle.sha256_file(target / "encoder.onnx.data")
    (target / bundle.MANIFEST).write_text(json.dumps(meta))
    users = {k: v for k, v in snapshot(target).items() if k in ("notes.md", "evaluation-test.json", "plots/curve.png")}
    old_inodes = {name: (target / name).stat().st_ino for name in ("encoder.onnx", "decoder.onnx", bundle.MANIFEST)}

    result = invoke("export", str(env["run"]), "--out", str(target), "--force", "--exporter", "torchscript")
    assert result.exit_code == 0, result.output
    after = snapshot(target)
    assert {k: after[k] for k in users} == users, "the user's files are untouched"
    assert "encoder.onnx.data" not in after
    assert all((target / name).stat().st_ino != inode for name, inode in old_inodes.items()), "export's files replaced"
    open_captioner(target, "onnx", provider="cpu")  # a complete, consistent bundle
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_item6_export_replaces_file_by_file_and_the_manifest_last(env, tmp_path, monkeypatch):
    target = tmp_path / "b"
    shutil.copytree(env["bundle"], target)
    moved: list[str] = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        if Path(dst).parent == target:
            moved.append(Path(dst).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    export(env["run"], target, force=True, exporter="torchscript")
    assert moved[-1] == bundle.MANIFEST and sorted(moved[:-1]) == ["decoder.onnx", "encoder.onnx", "vocab.json"]


def test_item6_a_folder_of_other_files_needs_force_and_keeps_them(env, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.md").write_text("keep\n")
    line = one_line_error(invoke("export", str(env["run"]), "--out", str(target), "--exporter", "torchscript"))
    assert "is not a capcli bundle" in line and snapshot(target) == {"notes.md": b"keep\n"}
    export(env["run"], target, force=True, exporter="torchscript")
    assert (target / "notes.md").read_text() == "keep\n" and (target / bundle.MANIFEST).is_file()


# --- item 10: operating-system errors ---------------------------------------------------------------------------


def test_item10_output_under_a_file_is_one_line(env, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    image = str(sorted((env["data"] / "Images").glob("*.jpg"))[0])
    for args in (["export", str(env["run"]), "--out", str(a_file / "b")],
                 ["export", str(env["run"]), "--out", str(a_file)],
                 ["evaluate", str(env["bundle"]), "--out", str(a_file / "e.json")],
                 ["caption", image, "--model", str(env["bundle"]), "--html", str(a_file / "r.html")]):
        line = one_line_error(invoke(*args))
        assert "is a file, not a folder" in line, line
    assert a_file.read_text() == "x"


def test_item10_output_naming_a_folder_is_one_line(env, tmp_path):
    image = str(sorted((env["data"] / "Images").glob("*.jpg"))[0])
    for args in (["evaluate", str(env["bundle"]), "--out", str(tmp_path)],
                 ["caption", image, "--model", str(env["bundle"]), "--html", str(tmp_path)]):
        assert "is a folder; name a file" in one_line_error(invoke(*args))


def test_item10_read_only_folders_are_one_line_before_any_work(env, tmp_path, monkeypatch):
    import capcli.runtime.captioner

    image = str(sorted((env["data"] / "Images").glob("*.jpg"))[0])
    ro = tmp_path / "ro"
    ro.mkdir()

    def no_captioning(*args, **kwargs):
        raise AssertionError("captioning started before the output was checked")

    monkeypatch.setattr(capcli.runtime.captioner, "caption_images", no_captioning)
    monkeypatch.setattr("capcli.evaluate.caption_images", no_captioning)
    with read_only(ro):
        for args in (["export", str(env["run"]), "--out", str(ro / "b")],
                     ["evaluate", str(env["bundle"]), "--out", str(ro / "e.json")],
                     ["caption", image, "--model", str(env["bundle"]), "--html", str(ro / "r.html")]):
            assert "not writable" in one_line_error(invoke(*args))
        monkeypatch.chdir(ro)  # the default evaluation output goes to the current folder: read-only here
        assert "not writable" in one_line_error(invoke("evaluate", str(env["bundle"])))


def test_item10_cache_naming_a_file_is_one_line(env, tmp_path, monkeypatch):
    a_file = tmp_path / "cache"
    a_file.write_text("x")
    monkeypatch.setenv("CAPCLI_CACHE", str(a_file))
    line = one_line_error(invoke("features", "--backbone", "tiny", "--dataset", str(env["data"]),
                                 "--weights", "none"))
    assert "CAPCLI_CACHE" in line and "is a file, not a folder" in line


def test_item10_disk_full_during_export_is_one_line_and_keeps_the_old_bundle(env, tmp_path):
    with small_disk(tmp_path / "disk", 512) as disk:
        shutil.copytree(env["bundle"], disk / "b")
        before = snapshot(disk / "b")
        fill(disk, leave_kb=24)  # room for some of the new files, not all
        line = one_line_error(invoke("export", str(env["run"]), "--out", str(disk / "b"), "--force"))
        assert "No space left on device" in line
        assert snapshot(disk / "b") == before, "the old bundle is untouched"
        assert sorted(p.name for p in disk.iterdir()) == ["b", "filler"], "no temporary folder left"


def test_item10_oserror_anywhere_is_one_line(monkeypatch, env):
    """The CLI group's last line of defence: an OSError no code path turned into a message."""
    import capcli.bundle.build

    def broken(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/some/where")

    monkeypatch.setattr(capcli.bundle.build, "export", broken)
    line = one_line_error(invoke("export", str(env["run"])))
    assert line == "error: Permission denied: /some/where"


# --- item 11: the exporter --------------------------------------------------------------------------------------


def test_item11_export_uses_the_dynamo_exporter_quietly(env, tmp_path, capfd):
    capfd.readouterr()
    out = export(env["run"], tmp_path / "b")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    meta = json.loads((out / bundle.MANIFEST).read_text())
    assert meta["exporter"] == {"encoder": "dynamo", "decoder": "dynamo"}
    assert meta["versions"]["onnxscript"]


def test_item11_fallback_to_torchscript_is_quiet_and_recorded(env, tmp_path, capfd, monkeypatch):
    import capcli.onnx_graphs

    def cannot_trace(*args, **kwargs):
        raise RuntimeError("data-dependent control flow\nmore detail")

    monkeypatch.setattr(capcli.onnx_graphs, "_export_dynamo", cannot_trace)
    capfd.readouterr()
    out = export(env["run"], tmp_path / "b")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    exporter = json.loads((out / bundle.MANIFEST).read_text())["exporter"]
    assert exporter["encoder"] == exporter["decoder"] == "torchscript"
    assert exporter["fallback_reasons"]["decoder"] == "RuntimeError: data-dependent control flow"


def test_item11_dynamo_without_onnxscript_is_one_clear_line(env, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(CapcliError, match="needs onnxscript"):
        export(env["run"], Path("unused"))
