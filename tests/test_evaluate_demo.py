import json
import shutil
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from typer.testing import CliRunner

from capcli.bundle.build import export
from capcli.cli import app
from capcli.errors import CapcliError
from capcli.evaluate import evaluate
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
    image = sorted((small_synthetic / "Images").glob("*.jpg"))[0]
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
    assert "METEOR" not in evaluation["scores"] and "METEOR (disabled)" in evaluation["skipped"]  # its time
    report = Path("runs/demo/report.html").read_text()
    assert report.count('<div class="attention">') >= 1 and "7x7 grid" in report  # the demo's attention maps
    assert "timings:" in result.stdout and "total" in result.stdout
    # Re-running is safe, also after an upgrade that changed the demo's settings: the run keeps its own.
    monkeypatch.setattr("capcli.demo.LR", 5e-4)
    again = CliRunner().invoke(app, ["demo", "--images", "120", "--epochs", "2"])
    assert again.exit_code == 0, again.output
    assert "resuming it" in again.output
    other = CliRunner().invoke(app, ["demo", "--images", "120", "--epochs", "2", "--decoder", "pooled"])
    assert other.exit_code == 1 and "holds an earlier demo run of the attention decoder" in other.output


# --- issue 9 item 8: evaluate does not mislead ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_synthetic):
    from tiny_models import tiny_env, tiny_plugin

    tmp = tmp_path_factory.mktemp("evaluate-tiny")
    with tiny_plugin(tmp / "plugin"):
        yield tiny_env(tmp, small_synthetic)


@pytest.fixture
def quick_scores(monkeypatch):
    """The same metrics without java (no PTB tokenizer, no METEOR): these tests are about which images count."""
    import functools

    import capcli.metrics

    monkeypatch.setattr(capcli.metrics, "score_captions",
                        functools.partial(capcli.metrics.score_captions, meteor=False, tokenizer="simple"))


@pytest.fixture
def dataset_copy(small_synthetic, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(small_synthetic, target)
    return target


def _test_split(data: Path) -> list[str]:
    from capcli.data.readers import load_dataset

    return load_dataset(str(data), seed=0).splits["test"]


def one_line(result, code: int) -> str:
    """The one error line, last on stderr (after the progress bar of the captioning done, if any)."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_item8_limit_below_one_is_refused(tiny, tmp_path, limit):
    line = one_line(CliRunner().invoke(app, ["evaluate", str(tiny["bundle"]), "--limit", limit,
                                             "--out", str(tmp_path / "e.json")]), 2)
    assert "--limit" in line and not (tmp_path / "e.json").exists()
    with pytest.raises(CapcliError, match="--limit must be at least 1"):
        evaluate(tiny["bundle"], limit=int(limit), out=tmp_path / "e.json")


def test_item8_missing_images_are_an_error_unless_allowed(tiny, quick_scores, dataset_copy, tmp_path):
    test = _test_split(dataset_copy)
    gone = test[::2]
    for name in gone:
        (dataset_copy / "Images" / name).unlink()
    out = tmp_path / "e.json"
    args = ["evaluate", str(tiny["bundle"]), "--dataset", str(dataset_copy), "--beam-size", "1", "--out", str(out)]
    line = one_line(CliRunner().invoke(app, args), 1)
    assert f"{len(gone)} of {len(test)} images of the test split are missing" in line and "--allow-missing" in line
    assert not out.exists(), "refused before any captioning"
    result = CliRunner().invoke(app, [*args, "--allow-missing", "--json"])
    assert result.exit_code == 0, result.output
    assert f"warning: {len(gone)} of {len(test)} images" in result.stderr
    report = json.loads(out.read_text())
    assert report["images"] == len(test) - len(gone) and sorted(report["missing"]) == sorted(gone)
    assert json.loads(result.stdout)["missing"] == report["missing"]


def test_item8_unreadable_images_fail_the_evaluation_unless_allowed(tiny, quick_scores, dataset_copy, tmp_path):
    broken = _test_split(dataset_copy)[0]
    (dataset_copy / "Images" / broken).write_bytes(b"not a png")
    out = tmp_path / "e.json"
    args = ["evaluate", str(tiny["bundle"]), "--dataset", str(dataset_copy), "--beam-size", "1", "--out", str(out),
            "--limit", "4"]
    line = one_line(CliRunner().invoke(app, args), 1)
    assert "1 of 4 images could not be captioned" in line and str(out) in line
    assert list(json.loads(out.read_text())["failed"]) == [broken], "the work done is kept, failures listed"
    result = CliRunner().invoke(app, [*args, "--allow-missing"])
    assert result.exit_code == 0 and "warning: 1 of 4 images could not be captioned" in result.stderr


def test_item8_default_output_is_not_inside_the_bundle(tiny, quick_scores, tmp_path, monkeypatch):
    from mounts import read_only

    bundle_copy = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], bundle_copy)
    before = sorted(p.name for p in bundle_copy.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with read_only(bundle_copy):  # a shared, read-only bundle must still be evaluable
        result = CliRunner().invoke(app, ["evaluate", str(bundle_copy), "--beam-size", "1", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in bundle_copy.iterdir()) == before
    assert json.loads((work / "evaluation-bundle-test.json").read_text())["images"] == 3
