"""`capcli export --quantize int8`: quantized graphs, the caption parity in capcli.json, refusal, bad requests,
and captioning / serving an int8 bundle unchanged.

Runs on the tiny plugin backbone with untrained decoders (bundles in seconds); the int8 graphs are the real
thing (ONNX Runtime's quantizer), only small.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from tiny_models import tiny_plugin
from typer.testing import CliRunner

from capcli.bundle.judge import PARITY_BATCH, PARITY_BEAM, Tolerance
from capcli.bundle.manifest import sha256_file
from capcli.cli import app
from capcli.data.readers import load_dataset
from capcli.images import load_input
from capcli.metrics import score_captions
from capcli.runtime.captioner import caption_images, open_captioner

CALIBRATION = 24
LOOSE = ("--min-agreement", "0", "--max-cider-loss", "100")  # the int8 bundle is written whatever it loses


def make_checkpoint(run: Path, dataset: Path, kind: str = "pooled", out_scale: float = 20.0) -> Path:
    """An untrained decoder on the tiny backbone with the dataset's vocabulary (run/best.pt).

    out_scale: large gives clear winners at each step (real captions); tiny gives near-ties, which int8
    rounding flips."""
    import torch
    from tiny_backbone import tiny

    from capcli.data.text import Vocabulary
    from capcli.model import checkpoint
    from capcli.model.attention import AttentionConfig, AttentionDecoder
    from capcli.model.pooled import CaptionDecoder, DecoderConfig

    ds = load_dataset(str(dataset), seed=0)
    vocab = Vocabulary.build([c for n in ds.splits["train"] for c in ds.captions[n]], threshold=1)
    torch.manual_seed(0)
    if kind == "attention":
        cfg = AttentionConfig(feature_dim=tiny.grid.channels, vocab_size=len(vocab), embed_dim=8, hidden_dim=16,
                              dropout=0.0, context_dim=8, attention_dim=8)
        decoder = AttentionDecoder(cfg)
    else:
        cfg = DecoderConfig(feature_dim=tiny.feature_dim, vocab_size=len(vocab), embed_dim=8, hidden_dim=16,
                            dropout=0.0)
        decoder = CaptionDecoder(cfg)
    with torch.no_grad():
        decoder.out.weight.mul_(out_scale)
        decoder.out.bias.mul_(out_scale / 20)
        decoder.out.bias[vocab.end_id] -= 2 * out_scale  # <end> unlikely: captions have words to compare
    run.mkdir(parents=True, exist_ok=True)
    checkpoint.save(run / "best.pt", {
        "config": cfg.to_dict(), "model": decoder.state_dict(), "vocab": vocab.to_json(), "decoder": kind,
        "vocab_sha256": vocab.sha256, "backbone": "tiny", "weights": "none", "feature_dim": cfg.feature_dim,
        "preprocessing": tiny.preprocessing.to_dict(), "max_len": 8, "dataset": str(dataset),
        "dataset_fingerprint": None, "train_config": {"dataset": str(dataset), "images": None, "seed": 0},
        "epoch": 0, "history": [],
    })
    return run


def export_cli(run: Path, out: Path, *options: str):
    return CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--exporter", "torchscript", *options])


def folder_state(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_synthetic):
    """Plugin, runs, and the float and int8 bundles of the clear-winner run (int8 through the CLI)."""
    tmp = tmp_path_factory.mktemp("quantize")
    with tiny_plugin(tmp / "plugin"):
        from capcli.bundle.build import export

        run = make_checkpoint(tmp / "run", small_synthetic)
        float_bundle = export(run, tmp / "float", exporter="torchscript")
        result = export_cli(run, tmp / "int8", "--quantize", "int8", "--calibration", str(CALIBRATION), *LOOSE)
        yield {"tmp": tmp, "data": small_synthetic, "run": run, "float": float_bundle, "int8": tmp / "int8",
               "export_result": result}


@pytest.fixture(scope="module")
def val_sample(env):
    ds = load_dataset(str(env["data"]), seed=0)
    names = [n for n in ds.splits["val"] if ds.image_path(n).is_file()]
    return ds, names


def test_int8_export_reports_its_figures(env):
    result = env["export_result"]
    assert result.exit_code == 0, result.output
    assert not result.stderr.strip(), f"the quantizer's logs leak: {result.stderr}"
    assert f"int8 ({CALIBRATION} calibration images, " in result.stdout and " conv biases corrected)" in result.stdout
    assert "captions agree" in result.stdout and "CIDEr-D" in result.stdout


def test_float16_bundle_halves_the_weights_and_captions_as_float(env, val_sample):
    ds, names = val_sample
    result = export_cli(env["run"], env["tmp"] / "half", "--quantize", "float16")
    assert result.exit_code == 0, result.output
    assert "float16 weights: graphs" in result.stdout and "captions agree" in result.stdout
    meta = json.loads((env["tmp"] / "half" / "capcli.json").read_text())
    q = meta["quantization"]
    # The tiny model's tensors are mostly under float16_weights' 1024-element floor: smaller, not half.
    assert q["mode"] == "float16" and q["graph_bytes"]["float16"] < q["graph_bytes"]["float32"]
    assert sum(q["float16_weights"].values()) > 0
    model = onnx.load(str(env["tmp"] / "half" / "decoder.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    paths = [ds.image_path(n) for n in names[:8]]
    half = caption_images(open_captioner(env["tmp"] / "half", "onnx", provider="cpu"), paths)
    full = caption_images(open_captioner(env["float"], "onnx", provider="cpu"), paths)
    assert [r.caption for r in half] == [r.caption for r in full]
    assert np.allclose([r.score for r in half], [r.score for r in full], atol=1e-2)


def test_int8_graphs_are_quantized(env):
    enc, dec = env["int8"] / "encoder.onnx", env["int8"] / "decoder.onnx"
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(enc)
    model = onnx.load(str(enc))
    init = {i.name: i for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    assert weight_dq.op_type == "DequantizeLinear", "the conv weight comes through a DequantizeLinear"
    assert init[weight_dq.input[0]].data_type == onnx.TensorProto.INT8, "int8 weights"
    assert onnx.numpy_helper.to_array(init[weight_dq.input[1]]).shape == (8,), "one scale per output channel"
    # The decoder's matrix products: int8 weights, activations quantized on the fly; none left in float.
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= op_types(dec)
    assert not {"MatMul", "Gemm"} & op_types(dec)
    # Inputs and outputs keep their float32 names and symbolic batch, so captioning needs no change.
    for float_graph, int8_graph in ((env["float"] / "encoder.onnx", enc), (env["float"] / "decoder.onnx", dec)):
        a, b = onnx.load(str(float_graph)).graph, onnx.load(str(int8_graph)).graph
        assert [(v.name, v.type.tensor_type.elem_type) for v in a.input] == \
               [(v.name, v.type.tensor_type.elem_type) for v in b.input]
        assert [v.name for v in a.output] == [v.name for v in b.output]


def test_manifest_records_the_caption_parity_it_measured(env, val_sample):
    ds, names = val_sample
    meta = json.loads((env["int8"] / "capcli.json").read_text())
    q = meta["quantization"]
    assert q["mode"] == "int8" and q["calibration_images"] == CALIBRATION and q["calibration_split"] == "train"
    int8_convs = [n for n in onnx.load(str(env["int8"] / "encoder.onnx")).graph.node
                  if n.op_type == "Conv" and n.input[2].endswith("bias")]
    assert q["encoder_bias_corrected_convs"] == len(int8_convs) > 0
    assert q["tolerance"] == {"min_agreement": 0.0, "max_cider_loss": 100.0}
    assert q["graph_bytes"]["int8"] == sum((env["int8"] / g).stat().st_size for g in ("encoder.onnx", "decoder.onnx"))
    p = q["parity"]
    assert p["images"] == len(names) >= 2 and p["beam_size"] == PARITY_BEAM
    # Caption the same validation images with both bundles as users do: the recorded figures must be these.
    caps = {}
    for label in ("float", "int8"):
        results = caption_images(open_captioner(env[label], "onnx", provider="cpu"),
                                 [ds.image_path(n) for n in names], beam_size=PARITY_BEAM,
                                 batch_size=PARITY_BATCH)
        caps[label] = {n: r.caption for n, r in zip(names, results, strict=True)}
        assert all(caps[label].values()), f"{label} bundle gives empty captions"
    agree = 100.0 * sum(caps["float"][n] == caps["int8"][n] for n in names) / len(names)
    assert p["agreement_percent"] == pytest.approx(agree)
    refs = {n: ds.captions[n] for n in names}
    for label, key in (("float", "float32"), ("int8", "int8")):
        cider = score_captions(refs, caps[label], meteor=False, tokenizer="simple").values["CIDEr-D"]
        assert p["scores"][key]["CIDEr-D"] == pytest.approx(cider)
    f, i = p["scores"]["float32"]["CIDEr-D"], p["scores"]["int8"]["CIDEr-D"]
    assert p["cider_loss_percent"] == pytest.approx(100.0 * (f - i) / f)
    assert p["bleu4_difference"] == pytest.approx(p["scores"]["int8"]["BLEU-4"] - p["scores"]["float32"]["BLEU-4"])


def test_int8_encoder_computes_in_int8_but_stays_close(env, val_sample):
    ds, names = val_sample
    outs = []
    for label in ("float", "int8"):
        captioner = open_captioner(env[label], "onnx", provider="cpu")
        images = np.stack([load_input(ds.image_path(n), captioner.preprocessing) for n in names])
        outs.append(np.concatenate([x.ravel() for x in captioner.encode(images)]))
    diff = np.abs(outs[0] - outs[1])
    assert diff.max() > 0, "int8 outputs equal float ones exactly: nothing was quantized"
    assert diff.max() < 0.1 * np.abs(outs[0]).max(), "int8 encoder strays far from the float one"


def test_caption_cli_captions_with_an_int8_bundle(env, val_sample):
    ds, names = val_sample
    images = [str(ds.image_path(n)) for n in names[:3]]
    result = CliRunner().invoke(app, ["caption", *images, "--model", str(env["int8"]), "--runtime", "onnx",
                                      "--provider", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    want = caption_images(open_captioner(env["int8"], "onnx", provider="cpu"), images, beam_size=3)
    assert [r["caption"] for r in rows] == [w.caption for w in want]
    assert all(len(r["caption"].split()) >= 2 and not r.get("error") for r in rows)


def test_serve_answers_from_an_int8_bundle(env, val_sample):
    from capcli.serve.app import ServeSettings, create_app

    ds, names = val_sample
    path = ds.image_path(names[0])
    want = caption_images(open_captioner(env["int8"], "onnx", provider="cpu"), [path], beam_size=3)[0]
    settings = ServeSettings(max_files=4, max_image_bytes=300_000, max_wait_ms=20)
    with TestClient(create_app(env["int8"], provider="cpu", settings=settings)) as client:
        response = client.post("/v1/captions", files={"images": (path.name, path.read_bytes(), "image/png")},
                               data={"beam_size": "3"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["caption"] == want.caption and result["caption"]


def test_attention_bundle_quantizes_and_captions(env, val_sample):
    from capcli.bundle.build import export

    ds, names = val_sample
    with tiny_plugin(env["tmp"] / "plugin"):
        run = make_checkpoint(env["tmp"] / "attention-run", env["data"], kind="attention")
        bundle = export(run, env["tmp"] / "attention-int8", exporter="torchscript", quantize="int8",
                        calibration=8, tolerance=Tolerance(0.0, 100.0))
    assert "MatMulInteger" in op_types(bundle / "decoder.onnx")
    assert "QuantizeLinear" in op_types(bundle / "encoder.onnx")
    meta = json.loads((bundle / "capcli.json").read_text())
    assert meta["decoder_kind"] == "attention" and meta["quantization"]["parity"]["images"] == len(names)
    results = caption_images(open_captioner(bundle, "onnx", provider="cpu"), [ds.image_path(n) for n in names[:2]],
                             beam_size=3, attention=True)
    assert all(r.caption and r.attention for r in results)


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def near_tie_run(env):
    """Output weights so small that every step is a near-tie: int8 rounding changes some captions."""
    return make_checkpoint(env["tmp"] / "near-tie-run", env["data"], out_scale=0.05)


def test_a_bundle_that_loses_too_much_is_refused_and_nothing_is_written(env, near_tie_run):
    out = env["tmp"] / "refused"
    with tiny_plugin(env["tmp"] / "plugin"):
        result = export_cli(near_tie_run, out, "--quantize", "int8", "--calibration", "8", "--min-agreement", "100")
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert "the int8 bundle loses too much" in line and "bundle not written" in line
    assert "tolerance: captions agree >= 100%, CIDEr-D loss <= 3%" in line
    agreement = float(line.split("captions agree ")[1].split("%")[0])
    assert agreement < 100.0
    assert not out.exists()
    assert not list(out.parent.glob(".refused.*")), "no temporary folder left behind"


def test_a_refused_int8_export_keeps_the_existing_bundle(env, near_tie_run):
    out = env["tmp"] / "existing"
    shutil.copytree(env["float"], out)
    (out / "notes.txt").write_text("mine")
    before = folder_state(out)
    with tiny_plugin(env["tmp"] / "plugin"):
        result = export_cli(near_tie_run, out, "--force", "--quantize", "int8", "--calibration", "8",
                            "--min-agreement", "100")
    assert result.exit_code == 1, result.output
    assert "the int8 bundle loses too much" in _one_error_line(result)
    assert folder_state(out) == before, "the bundle already there is untouched"
    assert not list(out.parent.glob(".existing.*"))
    assert open_captioner(out, "onnx", provider="cpu")  # still a working bundle


def test_unreadable_calibration_images_are_one_clear_error(env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    ds = load_dataset(str(data), seed=0)
    for name in ds.splits["train"]:
        ds.image_path(name).write_bytes(b"not an image")
    out = tmp_path / "b"
    with tiny_plugin(env["tmp"] / "plugin"):
        run = make_checkpoint(tmp_path / "run", data)
        result = export_cli(run, out, "--quantize", "int8", "--calibration", "8", *LOOSE)
    assert result.exit_code == 1, result.output
    assert _one_error_line(result).startswith(
        "error: none of the 8 calibration images of the training split could be read (e.g. ")
    assert not out.exists() and not list(tmp_path.glob(".b.*"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--calibration", "10"], "error: --calibration needs --quantize int8"),
        (["--quantize", "fp4"], "error: unknown quantization 'fp4'; use int8, float16"),
        (["--quantize", "int8", "--calibration", "0"], "error: --calibration needs at least 1 image, got 0"),
        (["--min-agreement", "95"], "error: --min-agreement and --max-cider-loss need --quantize int8 or float16"),
        (["--max-cider-loss", "1"], "error: --min-agreement and --max-cider-loss need --quantize int8 or float16"),
    ],
)
def test_bad_quantization_requests_are_one_clear_error(env, options, message, tmp_path):
    result = export_cli(env["run"], tmp_path / "b", *options)
    assert result.exit_code == 1, result.output
    assert _one_error_line(result) == message
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("options", [["--min-agreement", "101"], ["--max-cider-loss", "-1"]])
def test_out_of_range_tolerances_are_usage_errors(env, options, tmp_path):
    result = export_cli(env["run"], tmp_path / "b", "--quantize", "int8", *options)
    assert result.exit_code == 2, result.output
    assert options[0] in _one_error_line(result)
    assert not (tmp_path / "b").exists()


def _conv(name: str, inputs: list[str], group: int = 1) -> onnx.NodeProto:
    return onnx.helper.make_node("Conv", inputs, [name + "_out"], name=name, group=group)


@pytest.mark.parametrize(("groups", "kept"), [
    ((1, 8, 1, 1), ["stem", "c1"]),   # a MobileNet-style stem: the convs up to the first depthwise one
    ((8, 1, 1, 1), ["stem"]),
    ((1, 1, 1, 1), []),               # vgg16, resnet152, inceptionv3: no depthwise conv
    ((1, 1, 1, 8), []),               # a depthwise conv deep in the net is not part of a stem
])
def test_float_stem_keeps_the_convs_up_to_a_first_depthwise_one(groups, kept):
    from capcli.bundle.quantize import float_stem

    names = ["stem", "c1", "c2", "c3"]
    nodes = [_conv(n, ["x" if i == 0 else names[i - 1] + "_out", n + "_w"], g)
             for i, (n, g) in enumerate(zip(names, groups, strict=True))]
    assert float_stem(onnx.helper.make_graph(nodes, "g", [], [])) == kept


def test_int8_encoder_keeps_a_depthwise_stem_float_and_quantizes_the_rest(tmp_path, small_synthetic):
    import torch
    from torch import nn

    from capcli.backbone import Preprocessing
    from capcli.bundle.quantize import quantize_encoder

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU6(),
                        nn.Conv2d(8, 16, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3)).eval()
    src = tmp_path / "encoder.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), str(src), input_names=["images"], output_names=["out"],
                      dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    images = sorted((small_synthetic / "Images").glob("*.jpg"))[:16]
    kept = quantize_encoder(src, tmp_path / "int8.onnx", images, Preprocessing(input_size=32, resize=36),
                            tmp_path)["float_convs"]
    model = onnx.load(str(tmp_path / "int8.onnx"))
    produced_by = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weight_is_int8 = [getattr(produced_by.get(c.input[1]), "op_type", None) == "DequantizeLinear" for c in convs]
    assert len(kept) == 2 and [c.name for c in convs[:2]] == kept
    assert weight_is_int8 == [False, False, True, True]


def _export(net, path: Path, size: int = 32) -> Path:
    import torch

    torch.onnx.export(net, (torch.randn(2, 3, size, size),), str(path), input_names=["images"],
                      output_names=["out"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    return path


def test_box_filter_pools_become_the_depthwise_convs_they_equal(tmp_path):
    import onnxruntime as ort
    import torch
    from torch import nn

    from capcli.bundle.quantize import _preprocessed, box_filters_as_convs

    class Branches(nn.Module):  # inceptionv3's branch pool, and two pools that are not box filters
        def forward(self, x):
            return torch.cat([nn.functional.avg_pool2d(x, 3, stride=1, padding=1),
                              nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),
                              nn.functional.avg_pool2d(x, 3, stride=2, padding=1)[..., :1, :1].expand_as(x)], 1)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Branches()).eval()
    ready = _preprocessed(_export(net, tmp_path / "enc.onnx"), tmp_path / "enc.pre.onnx")
    model = onnx.load(str(ready))
    assert box_filters_as_convs(model) == 1
    onnx.checker.check_model(model)
    pools = [n for n in model.graph.node if n.op_type == "AveragePool"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in p.attribute} for p in pools]
    assert sorted((a["count_include_pad"], list(a["strides"])) for a in attrs) == [(0, [1, 1]), (1, [2, 2])]
    box = [n for n in model.graph.node if n.name.endswith("_as_conv")]
    assert [a.i for a in box[0].attribute if a.name == "group"] == [8]
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    before = ort.InferenceSession(str(ready), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_int8_encoder_has_no_int8_average_pool(tmp_path, small_synthetic):
    import torch
    from torch import nn

    from capcli.backbone import Preprocessing
    from capcli.bundle.quantize import quantize_encoder

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1),
                        nn.Conv2d(8, 8, 1)).eval()
    images = sorted((small_synthetic / "Images").glob("*.jpg"))[:16]
    changes = quantize_encoder(_export(net, tmp_path / "enc.onnx"), tmp_path / "int8.onnx", images,
                               Preprocessing(input_size=32, resize=36), tmp_path)
    model = onnx.load(str(tmp_path / "int8.onnx"))
    produced_by = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert "AveragePool" not in {n.op_type for n in model.graph.node}
    assert changes["pools_as_convs"] == 1
    assert [getattr(produced_by.get(c.input[1]), "op_type", None) for c in convs] == ["DequantizeLinear"] * 3
