"""Guidance used the wrong way: odd GuideOptions, --constrain where it cannot apply, what a constrained result says."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import capcli
from capcli.guidance import GuideOptions

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "exported" / "flickr8k"
PHOTOS = sorted((ROOT / "tests" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def shipped() -> capcli.Captioner:
    if not (SHIPPED / "capcli.json").is_file():
        pytest.skip("the shipped bundle is absent")
    return capcli.load(SHIPPED, provider="cpu")


@pytest.mark.parametrize("options, name", [
    ({"bonus": -5.0}, "bonus"),  # steered away from the classes' words: 'a brown and white is is licking'
    ({"bonus": math.nan}, "bonus"),  # was an IndexError in the beam search
    ({"bonus": math.inf}, "bonus"),
    ({"bonus": 1e30}, "bonus"),  # was the caption 'cat' with a score of 5e29
    ({"bonus": "5"}, "bonus"),
    ({"penalty": -8.0}, "penalty"),  # the guard's animals rewarded: 'a dog is puppies on a bird'
    ({"penalty": math.nan}, "penalty"),
    ({"penalty": math.inf}, "penalty"),
    ({"min_support": 0.0}, "min_support"),  # every word 'boosted' with support 0
    ({"min_support": -1.0}, "min_support"),
    ({"min_support": 2.0}, "min_support"),  # supports are probabilities: never confident
    ({"min_support": math.nan}, "min_support"),
    ({"guard": -0.1}, "guard"),
    ({"guard": math.nan}, "guard"),
    ({"guard": 1.5}, "guard"),
    ({"constrain": True, "constrain_support": -1.0}, "constrain_support"),
    ({"constrain": True, "constrain_support": 2.0}, "constrain_support"),
    ({"common": -1}, "common"),
    ({"common": 2.5}, "common"),
    ({"common": "300"}, "common"),  # was a numpy UFuncTypeError
    ({"top_classes": -1}, "top_classes"),  # was 999 classes reported
    ({"top_classes": 2.0}, "top_classes"),  # was a TypeError from a slice
    ({"top_classes": True}, "top_classes"),
    ({"enabled": "no"}, "enabled"),  # a non-empty string is true: guidance stayed on
    ({"constrain": "no"}, "constrain"),
    ({"enabled": False, "constrain": True}, "enabled"),  # as --constrain --no-guidance
])
def test_odd_guide_options_are_one_value_error_naming_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        GuideOptions(**options)


def test_the_edges_of_each_range_and_numpy_numbers_are_accepted():
    GuideOptions(bonus=0.0, penalty=0.0, guard=0.0, common=0, top_classes=0, constrain=True, constrain_support=0.0)
    GuideOptions(bonus=100, penalty=100, min_support=1, guard=1, constrain_support=1)
    GuideOptions(bonus=np.float32(4.0), min_support=np.float64(0.2), common=np.int64(10), top_classes=np.int32(5),
                 enabled=np.True_)


def test_the_api_refuses_odd_options_before_captioning(shipped):
    with pytest.raises(ValueError, match="bonus"):
        shipped.caption(PHOTOS[0], guidance=GuideOptions(bonus=math.nan))


def test_constrain_for_a_model_without_a_classifier_is_one_clear_error_in_the_cli_and_the_api(exported_tiny,
                                                                                              tmp_path):
    """A pooled bundle's encoder returns no classes: --constrain used to caption as if it were not given."""
    from typer.testing import CliRunner

    from capcli.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["caption", str(PHOTOS[0]), "--model", str(exported_tiny), "--constrain"])
    assert refused.exit_code == 1 and "--constrain" in refused.output and "no classifier" in refused.output
    assert "Traceback" not in refused.output
    out = tmp_path / "evaluation.json"
    refused = runner.invoke(app, ["evaluate", str(exported_tiny), "--constrain", "--limit", "2", "--out", str(out)])
    assert refused.exit_code == 1 and "no classifier" in refused.output and not out.exists()
    captioner = capcli.load(exported_tiny, provider="cpu")
    assert captioner.classifier is None
    with pytest.raises(ValueError, match="no classifier"):
        captioner.caption(PHOTOS[0], guidance=GuideOptions(constrain=True))
    # Guidance itself (on by default) still captions such a model, as before: it only has nothing to add.
    assert captioner.caption(PHOTOS[0], guidance=True).caption
    assert runner.invoke(app, ["caption", str(PHOTOS[0]), "--model", str(exported_tiny)]).exit_code == 0


def _classes(table: dict, *names: str) -> list[int]:
    return [next(i for i, c in enumerate(table["classes"]) if c["name"].split(",")[0] == n) for n in names]


def test_a_word_the_classes_boost_is_never_held_back_by_a_guard_above_min_support():
    """GuideOptions(guard=1.0) on the shipped bundle's cat photo: 'cat' (support 0.97) was both boosted and ruled
    out, its bias the penalty, and with constrain=True required while penalised."""
    from capcli.guidance import ClassWords, load_table

    vocab = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "is", "cat", "cats", "dogs", "puppy", "bird"]
    table = load_table("imagenet-1k")
    words = ClassWords(table, vocab)
    probs = np.zeros((1, 1000), np.float32)
    tabby, egyptian = _classes(table, "tabby", "Egyptian cat")
    probs[0, tabby], probs[0, egyptian] = 0.5, 0.4  # 'cat': support 0.9
    probs[0, 0] = 0.1
    bias, (seen,) = words.bias(probs, GuideOptions(guard=1.0, min_support=0.3, common=0, constrain=True))
    cat, cats, dog = vocab.index("cat"), vocab.index("cats"), vocab.index("dog")
    assert seen.boosted == {"cat": pytest.approx(0.9)} and seen.required == cat
    assert "cat" not in seen.ruled_out and bias[0, cat] == pytest.approx(5.0 * 0.9)
    assert bias[0, cats] == 0.0  # its plural is not held back either
    assert "dog" in seen.ruled_out and bias[0, dog] == -8.0  # the guard still rules out the others


def test_a_constrained_result_names_the_word_it_required():
    """`ImageClasses.required` is a vocabulary id, which the Python API gives no way to read, and `--json` did not
    say which word --constrain required."""
    from capcli.guidance import ClassWords, load_table

    vocab = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "is", "cat"]
    table = load_table("imagenet-1k")
    probs = np.zeros((2, 1000), np.float32)
    probs[0, _classes(table, "tabby")[0]] = 0.9
    probs[:, 0] += 1 - probs.sum(1)
    _, seen = ClassWords(table, vocab).bias(probs, GuideOptions(common=0, constrain=True))
    assert seen[0].required_word == "cat" and seen[0].to_json()["required"] == "cat"
    assert seen[1].required_word is None and "required" not in seen[1].to_json()  # nothing confident enough
    _, plain = ClassWords(table, vocab).bias(probs, GuideOptions(common=0))
    assert plain[0].required_word is None and "required" not in plain[0].to_json()


def test_caption_json_and_the_api_name_the_required_word(shipped):
    import json

    from typer.testing import CliRunner

    from capcli.cli import app

    cat = next(p for p in PHOTOS if p.name == "chelsea.jpg")
    result = CliRunner().invoke(app, ["caption", str(cat), "--model", str(SHIPPED), "--json", "--constrain"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.splitlines()[0])
    assert line["classes"]["required"] == "cat" and "cat" in line["caption"].split()
    found = shipped.caption(cat, guidance=GuideOptions(constrain=True))
    assert found.classes.required_word == "cat"
