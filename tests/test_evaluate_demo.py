import json
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from typer.testing import CliRunner

from capcli.cli import app
from capcli.evaluate import evaluate
from capcli.export import export
from capcli.metrics import simple_tokenize


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    return export(tiny_run, tmp_path_factory.mktemp("exported") / "tiny")


def test_evaluate_scores_generated_captions_of_the_split(bundle, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate(bundle, beam_size=3, out=out, show_progress=False)
    saved = json.loads(out.read_text())
    assert saved["split"] == "test" and saved["images"] == len(saved["captions"]) > 0
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(saved["scores"])
    assert all(0 <= v <= 1000 for v in saved["scores"].values())
    assert report["tokenizer"] in ("ptb", "simple")
    truth = saved["colour_shape_correct"]
    assert 0 <= truth["all_named"] <= truth["main_object"] + 100


def test_evaluate_agrees_with_pycocoevalcap_on_the_same_captions(bundle, tmp_path):
    report = evaluate(bundle, beam_size=1, out=tmp_path / "e.json", show_progress=False)
    refs = {c["image"]: c["references"] for c in report["captions"]}
    cands = {c["image"]: [c["caption"]] for c in report["captions"]}
    if report["tokenizer"] == "ptb":  # java present: pycocoevalcap's own tokenizer, as the metric does
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        refs = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        cands = tok.tokenize({k: [{"caption": c} for c in v] for k, v in cands.items()})
    else:
        refs = {k: [simple_tokenize(c) for c in v] for k, v in refs.items()}
        cands = {k: [simple_tokenize(c) for c in v] for k, v in cands.items()}
    bleu, _ = Bleu(4).compute_score(refs, cands)
    cider, _ = Cider().compute_score(refs, cands)
    assert report["scores"]["BLEU-4"] == pytest.approx(100 * bleu[3], abs=1e-6)
    assert report["scores"]["CIDEr-D"] == pytest.approx(100 * cider, abs=1e-6)


def test_evaluate_cli_json_with_the_torch_runtime(tiny_run, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", str(tiny_run), "--runtime", "torch", "--beam-size", "1",
                                      "--json", "--out", str(tmp_path / "e.json"), "--limit", "5"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 5 and summary["runtime"] == "torch"


def test_evaluate_unknown_split_is_one_clear_line(bundle):
    result = CliRunner().invoke(app, ["evaluate", str(bundle), "--split", "nope"])
    assert result.exit_code == 1
    assert "no 'nope' split" in result.stderr and "Traceback" not in result.output


def test_caption_html_report(bundle, small_synthetic, tmp_path):
    image = sorted((small_synthetic / "Images").glob("*.png"))[0]
    html = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["caption", str(image), "--model", str(bundle), "--html", str(html)])
    assert result.exit_code == 0, result.output
    text = html.read_text()
    assert "data:image/jpeg;base64," in text and image.name in text


def test_demo_runs_end_to_end_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--images", "120", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert Path("exported/demo/capcli.json").is_file() and Path("runs/demo/report.html").is_file()
    assert "BLEU-4" in result.stdout and "main object colour+shape right" in result.stdout
    evaluation = json.loads(Path("runs/demo/evaluation-test.json").read_text())
    assert evaluation["beam_size"] == 3 and evaluation["runtime"] == "onnx"
    again = CliRunner().invoke(app, ["demo", "--images", "120", "--epochs", "2"])  # re-running is safe
    assert again.exit_code == 0, again.output
