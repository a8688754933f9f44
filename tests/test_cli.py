"""User errors end with one clear line and exit 1, never a traceback."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.cli import app

KAGGLE_EXCERPT = Path(__file__).parent / "data" / "flickr8k_kaggle"


def run(*args):
    return CliRunner().invoke(app, list(args))


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_version_and_help():
    assert run("--version").stdout.startswith("capcli ")
    assert "train" in run("--help").stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--backbone", "nope"], "unknown backbone 'nope'; available: efficientnet_lite0"),
        (["features", "--backbone", "resnet152", "--dataset", "/no/such/place"], "/no/such/place"),
        (["export", "/no/such/run"], "no checkpoint at"),
        (["caption", "x.png", "--model", "/no/such/bundle"], "not a capcli bundle"),
        (["caption", "x.png", "--runtime", "tensorflow"], "unknown runtime 'tensorflow'"),
        (["features", "--backbone", "resnet152", "--weights", "/no/file.pt", "--dataset", str(KAGGLE_EXCERPT)],
         "no file at '/no/file.pt'"),
    ],
)
def test_user_errors_are_one_line(args, expected):
    assert expected in one_error_line(run(*args))


def test_features_cli_uses_the_cache(tiny_run, small_synthetic):
    result = run("features", "--backbone", "efficientnet_lite0", "--dataset", str(small_synthetic))
    assert result.exit_code == 0, result.output
    assert "1280-d float16 features" in result.stdout


def test_train_refuses_to_overwrite_a_run(tiny_run, small_synthetic):
    line = one_error_line(run("train", "--backbone", "efficientnet_lite0", "--dataset", str(small_synthetic),
                              "--out", str(tiny_run)))
    assert "--resume" in line


def test_imagenet_weights_offline_is_one_line(monkeypatch, small_synthetic):
    from urllib.error import URLError

    import torch.hub

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    line = one_error_line(run("features", "--backbone", "resnet152", "--dataset", str(small_synthetic)))
    assert "--weights none" in line
