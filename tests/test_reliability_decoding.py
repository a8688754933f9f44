"""Never NaN or Infinity in output, never a traceback (issue 19 item 5), and the server's smaller option checks
(item 8): the CLI refuses what the server refuses, JSON stays JSON, the server tells no absolute path."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tiny_models import tiny_checkpoint, tiny_plugin
from typer.testing import CliRunner

import capcli.runtime.captioner
from capcli.bundle.build import export
from capcli.cli import app
from capcli.runtime.captioner import CaptionResult
from capcli.serve.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("decoding")
    with tiny_plugin(tmp / "plugin"):
        run = tiny_checkpoint(tmp / "run", small_synthetic)
        bundle = export(run, tmp / "bundle", exporter="torchscript")
        photo = shutil.copy(next((small_synthetic / "Images").iterdir()), tmp / "photo.jpg")
        yield {"bundle": bundle, "photo": Path(photo), "tmp": tmp}


@pytest.fixture(scope="module")
def client(env):
    with TestClient(create_app(env["bundle"], provider="cpu", settings=ServeSettings(max_wait_ms=1))) as c:
        yield c


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("option, value, phrase", [
    ("--seed", "-1", "greater than or equal to 0"),
    ("--seed", str(2**63), "less than or equal to"),
    ("--temperature", "inf", "finite"),
    ("--temperature", "-inf", "finite"),
    ("--temperature", "nan", "finite"),
    ("--temperature", "1000", "0.001 to 100"),
])
def test_cli_refuses_what_the_server_refuses(env, option, value, phrase):
    line = one_line_error(invoke("caption", env["photo"], "--model", env["bundle"], "--sample", option, value), 2)
    assert option in line and phrase in line


def test_json_lines_never_carry_nan_or_infinity(env, monkeypatch):
    def non_finite(*_args, on_result=None, **_kwargs):
        result = CaptionResult(image=str(env["photo"]), caption="a word", score=float("-inf"),
                               alternatives=[("a word", float("nan"))])
        on_result(result)
        return [result]

    monkeypatch.setattr(capcli.runtime.captioner, "caption_images", non_finite)
    result = invoke("caption", env["photo"], "--model", env["bundle"], "--json")
    line = json.loads(result.stdout.splitlines()[0], parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert line["score"] is None and line["beams"][0]["score"] is None


def test_an_all_nan_float_image_is_one_line_without_numpy_warnings(env):
    nan, inf = env["tmp"] / "nan.tif", env["tmp"] / "inf.tif"
    Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F").save(nan)
    Image.fromarray(np.full((32, 32), np.inf, np.float32), mode="F").save(inf)
    partly = env["tmp"] / "partly.tif"
    pixels = np.full((32, 32), np.nan, np.float32)
    pixels[:16] = 3.0
    Image.fromarray(pixels, mode="F").save(partly)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke("caption", nan, inf, partly, "--model", env["bundle"], "--json")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 2 and all("no finite pixel value" in line for line in errors), result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert answers[2]["caption"] and answers[2].get("error") is None


def post(client, env, **fields):
    photo = env["photo"]
    return client.post("/v1/captions", files={"images": (photo.name, photo.read_bytes(), "image/jpeg")},
                       data={k: v for k, v in fields.items()})


def test_server_refuses_sampling_with_several_answers_like_the_cli(client, env):
    response = post(client, env, sample="true", n_best="2")
    assert response.status_code == 422 and "sample" in response.json()["error"], response.text


def test_server_refuses_a_repeated_option(client, env):
    photo = env["photo"]
    response = client.post("/v1/captions", files=[("images", (photo.name, photo.read_bytes(), "image/jpeg")),
                                                  ("beam_size", (None, "1")), ("beam_size", (None, "5"))])
    assert response.status_code == 422 and "beam_size" in response.json()["error"], response.text
    assert "more than once" in response.json()["error"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_server_names_a_non_finite_temperature(client, env, value):
    response = post(client, env, sample="true", temperature=value)
    error = response.json()["error"]
    assert response.status_code == 422 and "temperature" in error and "finite" in error, response.text


def test_server_bounds_top_k_by_the_vocabulary(client, env):
    size = json.loads((env["bundle"] / "capcli.json").read_text())["vocab_size"]
    assert post(client, env, sample="true", top_k=str(size)).status_code == 200
    response = post(client, env, sample="true", top_k=str(size + 1))
    assert response.status_code == 422 and "top_k" in response.json()["error"], response.text


def test_server_model_shows_no_absolute_path(client, env):
    text = client.get("/v1/model").text
    assert str(env["tmp"]) not in text and '"/' not in text, text
    assert json.loads(text)["manifest"]["source_checkpoint"] == "best.pt"
