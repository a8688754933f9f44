"""An attention run exported: bundle format 3, symbolic batch dims, context-aware decoding, attention in the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from capcli.bundle import schema
from capcli.bundle.build import export
from capcli.cli import app
from capcli.decode import beam_search, greedy
from capcli.errors import CapcliError
from capcli.images import load_input
from capcli.runtime.captioner import caption_images, open_captioner


@pytest.fixture(scope="module")
def attention_bundle(tiny_attention_run, tmp_path_factory):
    return export(tiny_attention_run, tmp_path_factory.mktemp("exported") / "attention")


@pytest.fixture(scope="module")
def pooled_bundle(tiny_run, tmp_path_factory):
    return export(tiny_run, tmp_path_factory.mktemp("exported") / "pooled")


def test_manifest_names_kind_context_and_grid(attention_bundle):
    meta = json.loads((attention_bundle / "capcli.json").read_text())
    assert meta["format_version"] == schema.FORMAT_VERSION == 3 and meta["decoder_kind"] == "attention"
    assert meta["io"]["state"] == ["h", "c"] and meta["io"]["context"] == ["grid", "projection"]
    # Lite0 declares its ImageNet head: the encoder also returns the class probabilities, last.
    assert meta["io"]["encoder"]["outputs"] == ["grid", "projection", "h0", "c0", "classes"]
    assert meta["classifier"]["classes"] == 1000
    assert meta["io"]["decoder"]["outputs"] == ["log_probs", "h_out", "c_out", "alpha"]
    assert meta["io"]["decoder"]["inputs"]["grid"] == ["batch", 49, 32]
    assert (meta["grid"]["height"], meta["grid"]["width"], meta["grid"]["positions"]) == (7, 7, 49)
    assert meta["feature_dim"] == 1280 and meta["decoder"]["context_dim"] == 32
    parity = meta["parity"]
    assert parity["encoder_max_abs_diff"] < 1e-3 and parity["step_log_probs_max_abs_diff"] < 2e-3
    assert parity["greedy_captions_equal"]


def test_every_batch_dimension_is_symbolic(attention_bundle):
    import onnx

    axes = {"encoder.onnx": {"images": 0, "grid": 0, "projection": 0, "h0": 1, "c0": 1, "classes": 0},
            "decoder.onnx": {"tokens": 0, "h": 1, "c": 1, "grid": 0, "projection": 0, "log_probs": 0,
                             "h_out": 1, "c_out": 1, "alpha": 0}}
    for graph, batch_axes in axes.items():
        model = onnx.load(str(attention_bundle / graph))
        values = list(model.graph.input) + list(model.graph.output)
        assert {v.name for v in values} == set(batch_axes), graph
        for value in values:
            dim = value.type.tensor_type.shape.dim[batch_axes[value.name]]
            assert dim.dim_param and not dim.dim_value, f"{graph}:{value.name} batch dim must be symbolic"


def test_beam_width_one_is_greedy_on_the_onnx_attention_step(attention_bundle, test_images):
    captioner = open_captioner(attention_bundle, "onnx", provider="cpu")
    images = np.stack([load_input(p, captioner.preprocessing) for p in test_images])
    state, context = captioner.start(images)
    assert [c.shape for c in context] == [(6, 49, 32), (6, 49, 32)]
    vocab = captioner.vocab
    g = greedy(captioner.step, state, vocab.start_id, vocab.end_id, 12, context=context)
    b = beam_search(captioner.step, state, vocab.start_id, vocab.end_id, beam_size=1, max_len=12, context=context)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    for h, hs in zip(g, b, strict=True):
        assert np.allclose(h.attention, hs[0].attention, atol=1e-6) and h.attention.shape == (len(h.tokens), 49)


def test_onnx_and_torch_agree_and_batches_do_not_mix(attention_bundle, tiny_attention_run, test_images):
    onnx_cap = open_captioner(attention_bundle, "onnx", provider="cpu")
    torch_cap = open_captioner(tiny_attention_run, "torch")
    for beam in (1, 3):
        a = caption_images(onnx_cap, test_images, beam_size=beam, batch_size=5, attention=True)
        b = caption_images(torch_cap, test_images, beam_size=beam, attention=True)
        one = caption_images(onnx_cap, test_images, beam_size=beam, batch_size=1)
        assert [r.caption for r in a] == [r.caption for r in b] == [r.caption for r in one]
        for r, s in zip(a, b, strict=True):
            assert all(np.abs(x - y).max() < 1e-3 for (_, x), (_, y) in zip(r.attention, s.attention, strict=True))


def test_caption_json_has_each_words_attention(attention_bundle, test_images):
    result = CliRunner().invoke(app, ["caption", *map(str, test_images[:2]), "--model", str(attention_bundle),
                                      "--json", "--attention", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for row in rows:
        attention = row["attention"]
        assert attention["grid"] == [7, 7]
        assert [w["word"] for w in attention["words"]] == row["caption"].split()
        for word in attention["words"]:
            assert len(word["alpha"]) == 49 and abs(sum(word["alpha"]) - 1) < 1e-3
    plain = CliRunner().invoke(app, ["caption", str(test_images[0]), "--model", str(attention_bundle), "--json"])
    assert "attention" not in json.loads(plain.stdout.splitlines()[0])


def test_readme_snippet_captions_from_an_attention_bundle(attention_bundle, test_images, tmp_path):
    from readme_snippet import PHOTOS, snippet_captions

    from capcli.runtime.captioner import Guards

    images = [test_images[0], *PHOTOS]
    expected = caption_images(open_captioner(attention_bundle, "onnx", provider="cpu"), images, beam_size=1,
                              guards=Guards(suppress_unk=True, no_repeat_ngram=0))  # as the snippet decodes
    assert snippet_captions(attention_bundle, images, tmp_path) == [r.caption for r in expected]


def test_attention_maps_of_a_pooled_model_are_one_clear_error(pooled_bundle, test_images):
    result = CliRunner().invoke(app, ["caption", str(test_images[0]), "--model", str(pooled_bundle), "--attention"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "attention maps need a model with the attention decoder" in lines[0]


def test_onnx_attention_captioning_does_not_import_torch(attention_bundle, test_images):
    code = (
        "import sys\n"
        "from capcli.cli import main\n"
        f"sys.argv = ['capcli', 'caption', {str(test_images[0])!r}, '--model', {str(attention_bundle)!r}, "
        "'--json', '--attention', '--beam-size', '3']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["caption"] and len(row["attention"]["words"]) == len(row["caption"].split())


def _as_version_2(folder):
    """What a pooled bundle looked like before format 3: no decoder kind, no state/context names."""
    meta = json.loads((folder / "capcli.json").read_text())
    meta["format_version"] = 2
    meta.pop("decoder_kind")
    meta["io"].pop("state")
    meta["io"].pop("context")
    (folder / "capcli.json").write_text(json.dumps(meta))


def test_a_version_2_bundle_still_captions(pooled_bundle, test_images, tmp_path):
    old = tmp_path / "v2"
    shutil.copytree(pooled_bundle, old)
    _as_version_2(old)
    now = caption_images(open_captioner(pooled_bundle, "onnx", provider="cpu"), test_images, beam_size=3)
    before = caption_images(open_captioner(old, "onnx", provider="cpu"), test_images, beam_size=3)
    assert [r.caption for r in before] == [r.caption for r in now] and all(r.caption for r in now)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("grid"), "'grid' is missing"),
        (lambda m: m["io"].update(context=[]), "an attention decoder needs context inputs"),
        (lambda m: m.pop("decoder_kind"), "'decoder_kind' is missing"),
        (lambda m: m.update(decoder_kind="transformer"), "'decoder_kind' must be one of pooled, attention"),
        (lambda m: m["decoder"].pop("attention_dim"), "'decoder.attention_dim' is missing"),
    ],
)
def test_manifest_kind_mix_ups_are_refused(attention_bundle, tmp_path, edit, message):
    broken = tmp_path / "broken"
    shutil.copytree(attention_bundle, broken)
    meta = json.loads((broken / "capcli.json").read_text())
    edit(meta)
    (broken / "capcli.json").write_text(json.dumps(meta))
    with pytest.raises(CapcliError, match=message):
        open_captioner(broken, "onnx", provider="cpu")


def test_a_pooled_manifest_over_attention_graphs_is_refused(attention_bundle, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(attention_bundle, mixed)
    meta = json.loads((mixed / "capcli.json").read_text())
    meta.update(decoder_kind="pooled")
    meta["io"]["context"] = []
    meta.pop("grid")
    (mixed / "capcli.json").write_text(json.dumps(meta))
    with pytest.raises(CapcliError, match="encoder.onnx has 5 outputs, expected 3"):
        open_captioner(mixed, "onnx", provider="cpu")
