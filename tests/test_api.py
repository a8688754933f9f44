"""The Python API (issue 30): `capcli.load(...).caption(...)` is the CLI's captioner, takes paths, Pillow images
and numpy arrays, one or a list, and never imports torch on the ONNX path; `import capcli` stays cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_env, tiny_plugin
from typer.testing import CliRunner

import capcli
from capcli.cli import app
from capcli.images import InMemoryImage, source_input
from capcli.runtime.captioner import caption_images, open_captioner

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "exported" / "flickr8k"
PHOTOS = sorted((ROOT / "tests" / "images").glob("*.jpg"))
needs_shipped = pytest.mark.skipif(not (SHIPPED / "capcli.json").is_file(), reason="the shipped bundle is absent")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def shipped() -> capcli.Captioner:
    if not (SHIPPED / "capcli.json").is_file():
        pytest.skip("the shipped bundle is absent")
    return capcli.load(SHIPPED, provider="cpu")


@pytest.fixture(scope="module")
def pooled(tmp_path_factory, small_synthetic):
    """A pooled run and its bundle on the tiny plugin backbone (seconds to make)."""
    tmp = tmp_path_factory.mktemp("api")
    with tiny_plugin(tmp / "plugin"):
        yield tiny_env(tmp, small_synthetic)


def test_import_capcli_loads_no_numpy_pillow_onnxruntime_or_torch(tmp_path):
    proc = _python("import sys, capcli; print(capcli.__version__); "
                   "print([m for m in ('numpy', 'PIL', 'onnxruntime', 'torch') if m in sys.modules])", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [capcli.__version__, "[]"]


@needs_shipped
def test_load_with_no_model_captions_photos_from_any_folder_without_importing_torch(tmp_path):
    """The README's first use: the shipped model, from a folder that is not the checkout, torch never imported."""
    code = ("import json, sys, capcli\n"
            f"results = capcli.load().caption({[str(p) for p in PHOTOS]!r})\n"
            "print(json.dumps([[r.image, r.caption, r.score] for r in results]))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n")
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results, torch_modules = proc.stdout.splitlines()
    assert torch_modules == "[]"
    results = json.loads(results)
    assert [r[0] for r in results] == [str(p) for p in PHOTOS]
    assert all(caption and score < 0 for _, caption, score in results)


@needs_shipped
def test_the_api_gives_what_capcli_caption_gives(shipped):
    """Same captioner, same options, same captions and scores as the CLI's JSON."""
    cli = CliRunner().invoke(app, ["caption", *map(str, PHOTOS), "--model", str(SHIPPED), "--provider", "cpu",
                                   "--beam-size", "5", "--beams", "3", "--json"])
    assert cli.exit_code == 0, cli.output
    want = [json.loads(line) for line in cli.stdout.splitlines()]
    got = shipped.caption(PHOTOS, beam_size=5, n_best=3)
    assert [r.caption for r in got] == [w["caption"] for w in want]
    assert [r.score for r in got] == pytest.approx([w["score"] for w in want])
    assert [[a.caption for a in r.alternatives] for r in got] == [[b["caption"] for b in w["beams"]] for w in want]


@needs_shipped
def test_one_image_gives_one_result_and_a_list_gives_a_list(shipped):
    one = shipped.caption(str(PHOTOS[0]))
    assert isinstance(one, capcli.CaptionResult) and one.image == str(PHOTOS[0]) and one.error is None
    listed = shipped.caption([PHOTOS[0]])
    assert isinstance(listed, list) and len(listed) == 1 and listed[0].caption == one.caption
    assert [r.caption for r in shipped.caption(p for p in PHOTOS[:2])] == \
        [r.caption for r in shipped.caption(PHOTOS[:2])]  # any iterable
    assert shipped.caption([]) == []


@needs_shipped
def test_pillow_images_and_arrays_caption_as_their_files(shipped):
    photo = PHOTOS[0]
    pil = Image.open(photo)
    array = np.asarray(pil.convert("RGB"))
    results = shipped.caption([photo, pil, array, array.astype(np.float32) / 255, pil.convert("RGBA")])
    assert [r.image for r in results] == [str(photo), "<image 1>", "<image 2>", "<image 3>", "<image 4>"]
    assert len({r.caption for r in results}) == 1 and all(r.error is None for r in results)
    prep = open_captioner(SHIPPED, provider="cpu").preprocessing
    for source in (pil, array, array.astype(np.float64) / 255):
        assert np.array_equal(source_input(InMemoryImage("x", source), prep), source_input(str(photo), prep))
    grey = shipped.caption(np.asarray(pil.convert("L")))
    assert grey.caption and grey.error is None


@needs_shipped
def test_attention_results_carry_each_words_weights(shipped):
    result = shipped.caption(PHOTOS[1])
    assert shipped.grid == (7, 7)
    assert [a.word for a in result.attention] == result.caption.split()
    for _word, weights in result.attention:
        assert weights.shape == (49,) and weights.sum() == pytest.approx(1, abs=1e-3)
    assert result.grid == (7, 7)
    assert "CPUExecutionProvider" in shipped.providers and "flickr8k" in repr(shipped)


@needs_shipped
def test_alternatives_default_to_the_whole_beam_and_greedy_and_sampling_give_one(shipped):
    beam = shipped.caption(PHOTOS[0], beam_size=4)
    assert len(beam.alternatives) == 4 and beam.alternatives[0] == (beam.caption, beam.score)
    assert [a.score for a in beam.alternatives] == sorted((a.score for a in beam.alternatives), reverse=True)
    assert shipped.caption(PHOTOS[0], beam_size=4, n_best=1).alternatives == []
    assert shipped.caption(PHOTOS[0], beam_size=1).alternatives == []
    sampled = [shipped.caption(PHOTOS[0], sample=True, seed=7, temperature=0.7).caption for _ in range(2)]
    assert sampled[0] == sampled[1]


@needs_shipped
def test_the_guards_are_options(shipped):
    rocket = ROOT / "tests" / "images" / "rocket.jpg"
    guarded = shipped.caption(rocket, beam_size=1)
    free = shipped.caption(rocket, beam_size=1, allow_unk=True, no_repeat_ngram=0)
    assert "<unk>" not in guarded.caption.split()
    want = caption_images(open_captioner(SHIPPED, provider="cpu"), [rocket], beam_size=1,
                          guards=capcli.api.Guards(suppress_unk=False, no_repeat_ngram=0))[0]
    assert free.caption == want.caption


@needs_shipped
def test_unreadable_images_raise_or_are_kept_with_their_error(shipped, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(capcli.ImageError, match="broken.jpg: not an image"):
        shipped.caption([PHOTOS[0], broken])
    with pytest.raises(capcli.ImageError, match="no such file"):
        shipped.caption(tmp_path / "missing.jpg")
    with pytest.raises(capcli.ImageError, match=r"<image 0>: an array image is \[H, W\]"):
        shipped.caption(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(capcli.ImageError, match="0.0 to 1.0"):
        shipped.caption(np.full((32, 32, 3), 255.0))
    assert issubclass(capcli.ImageError, capcli.CapcliError)
    kept = shipped.caption([broken, PHOTOS[0], np.zeros((2, 2, 2))], errors="keep")
    assert [r.error is None for r in kept] == [False, True, False]
    assert kept[0].caption is None and "not an image" in kept[0].error and kept[1].caption
    assert kept[2].error.startswith("<image 2>: ")


@needs_shipped
@pytest.mark.parametrize(("options", "message"), [
    ({"beam_size": 0}, "beam_size must be an integer >= 1"),
    ({"beam_size": 17}, "beam_size must be at most 16"),
    ({"beam_size": 2, "n_best": 3}, "beam_size=2"),
    ({"beam_size": 1, "n_best": 2}, "needs beam search"),
    ({"sample": True, "n_best": 2}, "sampling gives one caption"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"errors": "ignore"}, "errors must be"),
])
def test_bad_options_are_value_errors(shipped, options, message):
    with pytest.raises(ValueError, match=message):
        shipped.caption(PHOTOS[0], **options)


@needs_shipped
@pytest.mark.parametrize("thing", [b"\xff\xd8 jpeg bytes", 3, None, [b"bytes"]])
def test_things_that_are_not_images_are_type_errors(shipped, thing):
    with pytest.raises(TypeError, match="a path, a Pillow image or a numpy array"):
        shipped.caption(thing)


def test_load_refuses_a_missing_bundle_and_an_unknown_runtime(tmp_path):
    with pytest.raises(capcli.CapcliError):
        capcli.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="runtime"):
        capcli.load(tmp_path, runtime="tensorflow")  # type: ignore[arg-type]


def test_a_pooled_bundle_has_no_attention_and_torch_runtime_agrees(pooled, test_images):
    onnx = capcli.load(pooled["bundle"], provider="cpu")
    assert onnx.grid is None and onnx.runtime == "onnx"
    results = onnx.caption(test_images[:3], beam_size=1)
    assert all(r.attention is None and r.grid is None and r.caption for r in results)
    torch = capcli.load(pooled["run"], runtime="torch")
    assert torch.providers == [] and torch.runtime == "torch"
    assert [r.caption for r in torch.caption(test_images[:3], beam_size=1)] == [r.caption for r in results]


def test_all_lists_the_public_api_and_every_name_resolves():
    assert set(capcli.__all__) == {"Alternative", "CapcliError", "CaptionResult", "Captioner", "GuideOptions",
                                   "ImageClasses", "ImageError", "ImageInput", "WordAttention", "__version__", "load"}
    for name in capcli.__all__:
        assert getattr(capcli, name) is not None and name in dir(capcli)
    assert capcli.load is capcli.api.load and capcli.CaptionResult is capcli.runtime.captioner.CaptionResult
    with pytest.raises(AttributeError):
        capcli.no_such_name  # noqa: B018
