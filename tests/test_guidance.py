"""The backbone's classifier in the caption: the class-to-word table, the bias it gives decoding, both runtimes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from capcli.decode import beam_search, greedy
from capcli.guidance import ClassWords, GuideOptions, load_table
from capcli.runtime.captioner import NO_GUIDANCE, caption_images, open_captioner

IMAGES = sorted((Path(__file__).parent / "images").glob("*.jpg"))
# A vocabulary as training builds it (specials, then most frequent first), with words ImageNet classes speak
# through; "retriever" is far rarer in captions than "dog" (ranked 60 against 5), "animal" than "cat" is not.
VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "is", "on", "the", "dogs", "grass", "cat", "animal",
         "bird", "cup", "coffee", "mug", "rocket", "pizza", "sandwich", "cats", "puppy", "fly", "flies",
         *(f"filler{i}" for i in range(36)), "retriever"]


def _index(table: dict, name: str) -> int:
    return next(i for i, c in enumerate(table["classes"]) if c["name"].split(",")[0] == name)


def test_the_table_maps_breeds_to_dog_cats_to_cat_and_a_hot_dog_to_no_dog():
    table = load_table("imagenet-1k")
    assert len(table["classes"]) == 1000 and table["classes"][0]["id"] == "n01440764"
    words = ClassWords(table, VOCAB)
    spoken = {name: VOCAB[words.word_of[_index(table, name)]] for name in
              ("golden retriever", "Cardigan", "Chihuahua", "tabby", "Egyptian cat", "espresso", "coffee mug",
               "missile", "pizza")}
    assert spoken == {"golden retriever": "dog", "Cardigan": "dog", "Chihuahua": "dog", "tabby": "cat",
                      "Egyptian cat": "cat", "espresso": "coffee", "coffee mug": "mug", "missile": "rocket",
                      "pizza": "pizza"}
    assert VOCAB[words.word_of[_index(table, "hotdog")]] != "dog"
    guarded = {VOCAB[w]: {VOCAB[f] for f in forms} for w, forms in words.guarded}
    assert set(guarded) == {"dog", "cat", "bird"}  # animal words of many classes
    assert guarded["dog"] == {"dog", "dogs", "puppy"}  # with their kinds and plurals
    assert not {"fly", "flies"} & set().union(*guarded.values())  # a verb in captions more than an insect


def test_the_bias_boosts_confident_words_and_holds_back_a_dog_no_class_supports():
    table = load_table("imagenet-1k")
    words = ClassWords(table, VOCAB)
    probs = np.zeros((2, 1000), np.float32)
    probs[0, _index(table, "tabby")], probs[0, _index(table, "Egyptian cat")] = 0.5, 0.4  # a cat photo
    probs[1, _index(table, "golden retriever")] = 0.9  # a dog photo
    probs[:, 0] += 1 - probs.sum(1)
    options = GuideOptions(bonus=3.0, min_support=0.3, guard=0.02, penalty=8.0, common=0)
    bias, seen = words.bias(probs, options)
    cat, dog, dogs, cats, puppy = (VOCAB.index(w) for w in ("cat", "dog", "dogs", "cats", "puppy"))
    assert bias[0, cat] == pytest.approx(3.0 * 0.9) and bias[0, dog] == bias[0, dogs] == bias[0, puppy] == -8.0
    assert bias[1, dog] == pytest.approx(3.0 * 0.9) and bias[1, cat] == bias[1, cats] == -8.0
    assert seen[0].boosted == {"cat": pytest.approx(0.9)} and "dog" in seen[0].ruled_out
    assert seen[0].classes[0] == ("tabby", 0.5) and seen[0].required == -1  # constrained search is opt-in
    _, constrained = words.bias(probs, replace(options, constrain=True))
    assert constrained[0].required == cat and constrained[1].required == dog  # supports 0.9 >= 0.6
    _, strict = words.bias(probs, replace(options, constrain=True, constrain_support=0.95))
    assert strict[0].required == strict[1].required == -1
    # By default the vocabulary's 300 most frequent words get no bonus (the decoder places them itself): all of
    # this small vocabulary's; a rare word does.
    default, _ = words.bias(probs, GuideOptions())
    assert default[0, cat] == 0 and default[1, dog] == 0
    assert words.bias(probs, GuideOptions(common=12))[0][0, cat] == 0
    assert words.bias(probs, GuideOptions(common=11))[0][0, cat] > 0
    assert not GuideOptions(enabled=False).enabled


class _Step:
    """A language model that prefers 'a dog' and then ends: log-probs fixed per position."""

    def __init__(self, vocab_size: int):
        self.v = vocab_size

    def __call__(self, tokens, state):
        (pos,) = state
        lp = np.full((len(tokens), self.v), -6.0, np.float32)
        first = pos[0, :, 0] == 0
        lp[first, VOCAB.index("a")] = -0.1
        lp[~first & (tokens == VOCAB.index("a")), VOCAB.index("dog")] = -0.5
        lp[~first & (tokens == VOCAB.index("a")), VOCAB.index("cat")] = -2.0
        lp[~first & (tokens != VOCAB.index("a")), 2] = -0.1
        return lp, (pos + 1,)


def test_decoding_follows_the_bias_and_gives_a_bonus_once():
    state = (np.zeros((1, 2, 1), np.float32),)
    bias = np.zeros((2, len(VOCAB)), np.float32)
    bias[1, VOCAB.index("cat")], bias[1, VOCAB.index("dog")] = 3.0, -8.0
    for search in (lambda **kw: [h[0] for h in beam_search(beam_size=3, **kw)], greedy):
        hyps = search(step=_Step(len(VOCAB)), state=state, start_id=1, end_id=2, max_len=5, never=(0, 1, 3),
                      bias=bias)
        assert [" ".join(VOCAB[t] for t in h.tokens) for h in hyps] == ["a dog", "a cat"]


def test_a_bonus_stops_once_the_path_holds_the_word_and_a_penalty_does_not():
    from capcli.decode.steps import words_only

    bias = np.zeros((2, 6), np.float32)
    bias[:, 4], bias[:, 5] = 3.0, -8.0
    out = words_only(np.zeros((2, 6), np.float32), 2, (0, 1), 3, [[4], [3]], bias=bias)
    assert out[0, 4] == 0.0 and out[1, 4] == 3.0  # row 0 holds word 4 already
    assert out[0, 5] == out[1, 5] == -8.0


def test_constrained_search_places_the_required_word():
    from capcli.decode import constrained_beam_search

    state = (np.zeros((1, 2, 1), np.float32),)
    hyps = constrained_beam_search(_Step(len(VOCAB)), state, 1, 2, np.array([VOCAB.index("cat"), -1]),
                                   beam_size=2, max_len=5, never=(0, 1, 3))
    assert [" ".join(VOCAB[t] for t in h[0].tokens) for h in hyps] == ["a cat", "a dog"]


@pytest.fixture(scope="module")
def guided_bundle(tiny_attention_run, tmp_path_factory, monkeypatch_module) -> Path:
    """The tiny attention run exported (its Lite0 encoder returns ImageNet class probabilities), with a class table
    whose every class speaks through a word of the synthetic vocabulary, so that guidance changes captions."""
    from capcli.bundle.build import export
    from capcli.guidance import TABLES

    bundle = export(tiny_attention_run, tmp_path_factory.mktemp("bundles") / "guided")
    itos = json.loads((bundle / "vocab.json").read_text())["itos"]
    shapes = [w for w in ("circle", "square", "triangle", "star", "cross") if w in itos]
    table = {"labels": "imagenet-1k", "classes": [
        {"id": c["id"], "name": c["name"], "words": [[shapes[i % len(shapes)], 0]], "animal": False}
        for i, c in enumerate(load_table("imagenet-1k")["classes"])]}
    path = tmp_path_factory.mktemp("table") / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch_module.setitem(TABLES, "imagenet-1k", path)
    load_table.cache_clear()
    yield bundle
    load_table.cache_clear()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_encoder_returns_class_probabilities_and_the_manifest_says_so(guided_bundle):
    meta = json.loads((guided_bundle / "capcli.json").read_text())
    assert meta["classifier"] == {"labels": "imagenet-1k", "classes": 1000, "output": "classes", "reads": "the grid"}
    assert meta["io"]["encoder"]["outputs"][-1] == "classes"
    captioner = open_captioner(guided_bundle, "onnx", "cpu")
    from capcli.images import load_input

    _, _, probs = captioner.start_with_classes(np.stack([load_input(p, captioner.preprocessing) for p in IMAGES]))
    assert probs.shape == (len(IMAGES), 1000) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert int(probs[[p.name for p in IMAGES].index("chelsea.jpg")].argmax()) in range(281, 286)  # a cat


def test_both_runtimes_agree_with_guidance_on_and_the_option_turns_it_off(guided_bundle, tiny_attention_run):
    options = GuideOptions(bonus=4.0, min_support=0.05, common=0)  # the synthetic vocabulary is all common words
    onnx = caption_images(open_captioner(guided_bundle, "onnx", "cpu"), IMAGES, guidance=options)
    torch_ = caption_images(open_captioner(tiny_attention_run, "torch"), IMAGES, guidance=options)
    off = caption_images(open_captioner(guided_bundle, "onnx", "cpu"), IMAGES, guidance=NO_GUIDANCE)
    assert [r.caption for r in onnx] == [r.caption for r in torch_]
    assert all(r.classes is not None and r.classes.boosted for r in onnx)
    assert all(r.classes is None for r in off)
    assert [r.caption for r in onnx] != [r.caption for r in off]  # the bonus moved at least one caption


def test_the_python_api_takes_guidance_on_off_or_as_options(guided_bundle):
    import capcli

    captioner = capcli.load(guided_bundle, provider="cpu")
    assert captioner.classifier == "imagenet-1k"
    options = capcli.GuideOptions(bonus=4.0, min_support=0.05, common=0)
    steered = captioner.caption(IMAGES, guidance=options)
    expected = caption_images(open_captioner(guided_bundle, "onnx", "cpu"), IMAGES, guidance=options)
    assert [r.caption for r in steered] == [r.caption for r in expected]
    assert all(isinstance(r.classes, capcli.ImageClasses) and r.classes.boosted for r in steered)
    off = captioner.caption(IMAGES, guidance=False)
    assert all(r.classes is None for r in off) and [r.caption for r in off] != [r.caption for r in steered]
    assert all(r.classes is not None for r in captioner.caption(IMAGES, guidance=True))  # capcli's defaults
    with pytest.raises(ValueError, match="guidance must be"):
        captioner.caption(IMAGES[0], guidance="yes")


def test_constrained_captions_name_the_required_word_in_both_runtimes_and_the_cli_asks_for_it(guided_bundle,
                                                                                              tiny_attention_run):
    from typer.testing import CliRunner

    from capcli.cli import app
    from capcli.cli.options import guide_options

    # Every class of the test table speaks through a shape word; demand one the plain search would not place.
    options = GuideOptions(bonus=0.0, min_support=0.05, common=0, constrain=True, constrain_support=0.05)
    onnx = caption_images(open_captioner(guided_bundle, "onnx", "cpu"), IMAGES, guidance=options)
    torch_ = caption_images(open_captioner(tiny_attention_run, "torch"), IMAGES, guidance=options)
    assert [r.caption for r in onnx] == [r.caption for r in torch_]
    itos = json.loads((guided_bundle / "vocab.json").read_text())["itos"]
    required = [itos[r.classes.required] for r in onnx]
    assert all(word in r.caption.split() for word, r in zip(required, onnx, strict=True))
    plain = caption_images(open_captioner(guided_bundle, "onnx", "cpu"), IMAGES,
                           guidance=replace(options, constrain=False))
    assert any(word not in r.caption.split() for word, r in zip(required, plain, strict=True))
    assert guide_options(True, True).constrain and not guide_options(True, False).constrain
    assert not guide_options(False, False).enabled
    refused = CliRunner().invoke(app, ["caption", str(IMAGES[0]), "--model", str(guided_bundle), "--constrain",
                                       "--no-guidance"])
    assert refused.exit_code == 1 and "--constrain needs guidance" in refused.output
    greedy = CliRunner().invoke(app, ["caption", str(IMAGES[0]), "--model", str(guided_bundle), "--constrain",
                                      "--beam-size", "1"])
    assert greedy.exit_code == 1 and "--constrain needs beam search" in greedy.output
    import capcli

    with pytest.raises(ValueError, match="needs beam search"):
        capcli.load(guided_bundle, provider="cpu").caption(IMAGES[0], sample=True,
                                                           guidance=GuideOptions(constrain=True))


def test_caption_json_and_the_report_show_the_classes(guided_bundle, tmp_path):
    from typer.testing import CliRunner

    from capcli.cli import app

    result = CliRunner().invoke(app, ["caption", str(IMAGES[0]), "--model", str(guided_bundle), "--json",
                                      "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.splitlines()[0])
    assert line["classes"]["classes"][0]["name"] and "boosted" in line["classes"]
    assert "classifier: " in (tmp_path / "r.html").read_text()
    off = CliRunner().invoke(app, ["caption", str(IMAGES[0]), "--model", str(guided_bundle), "--json",
                                   "--no-guidance"])
    assert "classes" not in json.loads(off.stdout.splitlines()[0])


def test_a_model_without_a_classifier_captions_without_guidance(exported_tiny, tiny_attention_run, tmp_path,
                                                                monkeypatch):
    from capcli.bundle.build import export
    from capcli.registry import get_backbone

    # A pooled bundle has no class output; nor has an attention bundle of a backbone without a classifier, as
    # every bundle exported before classifiers existed.
    plain = replace(get_backbone("efficientnet_lite0"), classifier=None)
    monkeypatch.setattr("capcli.registry.get_backbone", lambda name: plain)
    older = export(tiny_attention_run, tmp_path / "older")
    meta = json.loads((older / "capcli.json").read_text())
    assert "classifier" not in meta and "classes" not in meta["io"]["encoder"]["outputs"]
    for bundle in (exported_tiny, older):
        results = caption_images(open_captioner(bundle, "onnx", "cpu"), IMAGES)
        assert all(r.caption and r.classes is None for r in results)


def test_the_report_names_a_required_word_and_evaluate_records_constrained_search(guided_bundle, small_synthetic,
                                                                                    tmp_path):
    from capcli.evaluate import evaluate
    from capcli.report import _classes_html

    shown = _classes_html({"classes": [{"name": "tabby", "p": 0.9}], "boosted": {"cat": 0.9}, "required": "cat"})
    assert "required: cat" in shown and "required" not in _classes_html({"classes": [{"name": "tabby", "p": 0.9}]})
    options = GuideOptions(bonus=0.0, min_support=0.05, common=0, constrain=True, constrain_support=0.05)
    report = evaluate(guided_bundle, str(small_synthetic), split="test", beam_size=3, provider="cpu", limit=4,
                      out=tmp_path / "e.json", show_progress=False, guidance=options)
    assert report["guidance"] and report["constrain"]
    assert all(c["classes"]["required"] in c["caption"].split() for c in report["captions"])
    plain = evaluate(guided_bundle, str(small_synthetic), split="test", beam_size=3, provider="cpu", limit=4,
                     out=tmp_path / "p.json", show_progress=False)
    assert plain["guidance"] and not plain["constrain"]


def test_serve_takes_constrain_and_refuses_it_where_it_cannot_apply(guided_bundle, exported_tiny, monkeypatch):
    from fastapi.testclient import TestClient

    from capcli.serve.app import create_app

    # The server's constrained search is the captioner's: with guidance options that require a word of every
    # photo, each served caption names it.
    options = GuideOptions(bonus=0.0, min_support=0.05, common=0, constrain=True, constrain_support=0.05)
    monkeypatch.setattr("capcli.serve.batcher.DEFAULT_GUIDANCE", replace(options, constrain=False))
    expected = caption_images(open_captioner(guided_bundle, "onnx", "cpu"), IMAGES[:2], guidance=options)
    photos = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in IMAGES[:2]]
    with TestClient(create_app(guided_bundle, provider="cpu")) as client:
        answer = client.post("/v1/captions", files=photos, data={"constrain": "true"})
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [r["caption"] for r in results] == [r.caption for r in expected]
        assert all(r["classes"]["required"] in r["caption"].split() for r in results)
        for data, message in (({"constrain": "true", "guidance": "false"}, "constrain needs guidance"),
                              ({"constrain": "true", "beam_size": "1"}, "constrain needs beam search")):
            refused = client.post("/v1/captions", files=photos, data=data)
            assert refused.status_code == 422 and message in refused.json()["error"]
    with TestClient(create_app(exported_tiny, provider="cpu")) as client:  # a pooled bundle: no classes
        refused = client.post("/v1/captions", files=photos, data={"constrain": "true"})
        assert refused.status_code == 422 and "no ImageNet classes" in refused.json()["error"]


def test_constrain_with_a_label_set_without_a_table_names_it_in_the_cli_the_api_and_the_server(guided_bundle,
                                                                                               tmp_path):
    import shutil

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    import capcli
    from capcli.cli import app
    from capcli.serve.app import create_app

    edited = tmp_path / "edited"
    shutil.copytree(guided_bundle, edited)
    meta = json.loads((edited / "capcli.json").read_text())
    meta["classifier"]["labels"] = "imagenet-21k"  # a label set capcli ships no word table for
    (edited / "capcli.json").write_text(json.dumps(meta))
    photo = IMAGES[0]
    result = CliRunner().invoke(app, ["caption", str(photo), "--model", str(edited), "--constrain"])
    assert result.exit_code == 1 and "label set 'imagenet-21k', which has no word table" in result.output
    with pytest.raises(ValueError, match="imagenet-21k"):
        capcli.load(edited, provider="cpu").caption(photo, guidance=capcli.GuideOptions(constrain=True))
    upload = {"images": (photo.name, photo.read_bytes(), "image/jpeg")}
    with TestClient(create_app(edited, provider="cpu")) as client:
        refused = client.post("/v1/captions", files=upload, data={"constrain": "true"})
        assert refused.status_code == 422 and "imagenet-21k" in refused.json()["error"]
        assert client.post("/v1/captions", files=upload).status_code == 200  # guidance alone still captions
