import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from capcli.bundle import schema
from capcli.bundle.build import export
from capcli.cli import app
from capcli.errors import CapcliError
from capcli.runtime.captioner import caption_images, open_captioner

ROOT = Path(__file__).parents[1]


def test_bundle_layout_and_manifest(tiny_bundle):
    import onnx

    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"encoder.onnx", "decoder.onnx", "vocab.json", "capcli.json"} <= names
    meta = json.loads((tiny_bundle / "capcli.json").read_text())
    assert meta["format_version"] == schema.FORMAT_VERSION and meta["backbone"] == "efficientnet_lite0"
    assert meta["preprocessing"]["input_size"] == 224 and meta["special_tokens"]["start"] == 1
    assert set(meta["sha256"]) >= {"encoder.onnx", "decoder.onnx", "vocab.json"}
    assert meta["parity"]["encoder_max_abs_diff"] < 1e-3 and meta["parity"]["greedy_captions_equal"]
    for graph, batch_inputs in (("encoder.onnx", {"images": 0}), ("decoder.onnx", {"tokens": 0, "h": 1, "c": 1})):
        model = onnx.load(str(tiny_bundle / graph))
        for value in model.graph.input:
            dim = value.type.tensor_type.shape.dim[batch_inputs[value.name]]
            assert dim.dim_param and not dim.dim_value, f"{graph}:{value.name} batch dim must be symbolic"


@pytest.mark.parametrize("beam", [1, 3])
def test_onnx_and_torch_runtimes_give_the_same_captions(tiny_bundle, tiny_run, test_images, beam):
    onnx_caps = caption_images(open_captioner(tiny_bundle, "onnx", provider="cpu"), test_images, beam_size=beam)
    torch_caps = caption_images(open_captioner(tiny_run, "torch"), test_images, beam_size=beam)
    assert [r.caption for r in onnx_caps] == [r.caption for r in torch_caps]
    assert np.allclose([r.score for r in onnx_caps], [r.score for r in torch_caps], atol=1e-3)
    assert all(r.caption for r in onnx_caps)


def test_batch_size_does_not_change_captions(tiny_bundle, test_images):
    captioner = open_captioner(tiny_bundle, "onnx", provider="cpu")
    one = caption_images(captioner, test_images, beam_size=3, batch_size=1)
    many = caption_images(captioner, test_images, beam_size=3, batch_size=5)
    assert [r.caption for r in one] == [r.caption for r in many]


def test_torch_runtime_reads_the_bundles_source_checkpoint(tiny_bundle, test_images):
    captioner = open_captioner(tiny_bundle, "torch")
    assert caption_images(captioner, test_images[:2], beam_size=1)[0].caption


def test_altered_bundle_is_refused(tiny_bundle, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(tiny_bundle, altered)
    with open(altered / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CapcliError, match="altered: sha256 of decoder.onnx"):
        open_captioner(altered, "onnx")


def test_unknown_format_version_is_refused(tiny_bundle, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(tiny_bundle, newer)
    meta = json.loads((newer / "capcli.json").read_text())
    meta["format_version"] = 99
    (newer / "capcli.json").write_text(json.dumps(meta))
    with pytest.raises(CapcliError, match="format version 99 is not supported"):
        open_captioner(newer, "onnx")


def test_export_keeps_an_existing_bundle_unless_forced(tiny_run, tiny_bundle, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(tiny_bundle, target)
    before = (target / "capcli.json").read_text()
    with pytest.raises(CapcliError, match="--force"):
        export(tiny_run, target)
    assert (target / "capcli.json").read_text() == before
    export(tiny_run, target, force=True)
    assert json.loads((target / "capcli.json").read_text())["created"]
    assert not list(tmp_path.glob(".b.*")), "no temporary folders left behind"


@pytest.mark.parametrize("weight", ["out.bias", "init_h.bias"])  # the step's log-probs; the encoder's h0
def test_export_refuses_a_checkpoint_whose_outputs_are_not_finite(tiny_run, tmp_path, weight):
    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["model"][weight].fill_(float("nan"))  # NaN compares false with every tolerance: it must not pass parity
    torch.save(ckpt, run / "best.pt")
    with pytest.raises(CapcliError, match="outputs are not finite .*bundle not written"):
        export(run, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_caption_cli_reports_each_bad_image_and_captions_the_rest(tiny_bundle, test_images, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(test_images[0].read_bytes()[:200])
    args = ["caption", str(test_images[0]), str(tmp_path / "missing.png"), str(not_image), str(truncated),
            str(test_images[1]), "--model", str(tiny_bundle), "--json", "--provider", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is JSON
    assert [r["image"] for r in lines] == args[1:6], "every image in order, failed ones too"
    assert [r.get("error") is None for r in lines] == [True, False, False, False, True]
    assert all(r["caption"] for r in (lines[0], lines[4]))
    assert all(r["caption"] is None and r["error"] for r in lines[1:4])
    for name in ("missing.png", "notes.jpg", "cut.png"):
        assert sum(name in line for line in result.stderr.splitlines()) == 1


def test_caption_cli_table_and_beams(tiny_bundle, test_images):
    result = CliRunner().invoke(app, ["caption", str(test_images[0]), "--model", str(tiny_bundle), "--json",
                                      "--beams", "3", "--beam-size", "3"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[0])
    assert 1 <= len(row["beams"]) <= 3 and row["beams"][0]["caption"] == row["caption"]
    table = CliRunner().invoke(app, ["caption", str(test_images[0]), "--model", str(tiny_bundle)])
    assert table.exit_code == 0 and "captions (onnx, beam 3)" in table.stdout
    assert f"{row['score']:.3f}" in table.stdout


def test_onnx_captioning_does_not_import_torch(tiny_bundle, test_images):
    code = (
        "import sys\n"
        "from capcli.cli import main\n"
        f"sys.argv = ['capcli', 'caption', {str(test_images[0])!r}, '--model', {str(tiny_bundle)!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[0])["caption"]


def test_readme_snippet_captions_with_onnxruntime_numpy_pillow_only(tiny_bundle, test_images, tmp_path):
    from readme_snippet import PHOTOS, snippet, snippet_captions

    assert len(snippet().strip().splitlines()) <= 26
    images = [test_images[0], *PHOTOS]
    from capcli.runtime.captioner import Guards

    # The snippet suppresses <unk> as capcli does; it leaves out capcli's repeated-n-gram block (shorter).
    expected = caption_images(open_captioner(tiny_bundle, "onnx", provider="cpu"), images, beam_size=1,
                              guards=Guards(suppress_unk=True, no_repeat_ngram=0))
    assert snippet_captions(tiny_bundle, images, tmp_path) == [r.caption for r in expected]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_bundle, test_images):
    from capcli.runtime.captioner import Sampling

    captioner = open_captioner(tiny_bundle, "onnx", provider="cpu")
    greedy = caption_images(captioner, test_images, beam_size=1)
    top1 = caption_images(captioner, test_images, sampling=Sampling(temperature=0.7, top_k=1, seed=3))
    assert [r.caption for r in top1] == [r.caption for r in greedy]
    a = caption_images(captioner, test_images, sampling=Sampling(temperature=1.5, seed=7))
    b = caption_images(captioner, test_images, sampling=Sampling(temperature=1.5, seed=7))
    assert [r.caption for r in a] == [r.caption for r in b]
    result = CliRunner().invoke(app, ["caption", str(test_images[0]), "--model", str(tiny_bundle), "--sample",
                                      "--top-k", "3", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout.splitlines()[0])["caption"]


def test_explicit_cuda_provider_without_cuda_is_an_error(tiny_bundle, test_images):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback case cannot happen here")
    result = CliRunner().invoke(app, ["caption", str(test_images[0]), "--model", str(tiny_bundle),
                                      "--provider", "cuda"])
    assert result.exit_code == 1 and "--provider cuda asked for" in result.stderr
