"""Feature-extraction engines: ONNX Runtime on a cached backbone graph agrees with PyTorch."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_backbone import tiny
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.readers import load_dataset
from capcli.errors import CapcliError
from capcli.features import cache as feature_cache
from capcli.features import engines
from capcli.features import extraction as features
from capcli.registry import get_backbone

PHOTOS = sorted((Path(__file__).parent / "images").glob("*.jpg"))


FP16_STEP = 2.0**-10  # float16's spacing relative to a value, at most (one step of its 10-bit mantissa)
NEAR_ZERO = 2.0**-6  # entries below this share of their row's largest are judged at that level


def agree(a: np.ndarray, b: np.ndarray, rel: float) -> bool:
    """|a - b| <= rel * |a| everywhere, |a| floored at NEAR_ZERO of the row's largest finite value (summation
    order alone moves entries near zero by more than their own float16 step); equal entries (infinities too:
    float16 overflows on some random-weight features) always agree."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    row_max = np.where(np.isfinite(a), np.abs(a), 0).max(axis=-1, keepdims=True)
    scale = np.maximum(np.abs(a), NEAR_ZERO * row_max)
    with np.errstate(invalid="ignore"):
        return bool(np.all((a == b) | (np.abs(a - b) <= rel * scale)))


@pytest.fixture(scope="module")
def photos_dataset(tmp_path_factory) -> Path:
    """The real photos of tests/images as a Kaggle-layout dataset."""
    root = tmp_path_factory.mktemp("photos")
    (root / "Images").mkdir()
    lines = ["image,caption"]
    for photo in PHOTOS:
        shutil.copy(photo, root / "Images" / photo.name)
        lines.append(f"{photo.name},a photo")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(
    ("backbone", "weights"),
    [("efficientnet_lite0", "imagenet"), ("efficientnet_lite0", "none"), ("resnet152", "none"),
     ("inceptionv3", "none"), ("vgg16", "none")],
)
def test_onnx_and_torch_extractors_agree_on_real_photos(backbone, weights):
    from capcli.images import load_pixels

    spec = get_backbone(backbone)
    batch = np.stack([load_pixels(p, spec.preprocessing) for p in PHOTOS])
    out = {engine: engines.make_extractor(spec, weights, engine, "cpu")(batch) for engine in ("torch", "onnx")}
    assert out["onnx"].shape == (len(PHOTOS), spec.feature_dim) and out["onnx"].dtype == np.float32
    assert np.isfinite(out["onnx"]).all() and np.abs(out["onnx"]).max() > 0
    assert agree(out["torch"], out["onnx"], FP16_STEP / 2)  # less than float16's own rounding error


def test_cached_features_of_both_engines_agree_and_record_the_engine(photos_dataset):
    import torch

    from capcli.images import load_input

    spec = get_backbone("efficientnet_lite0")
    ds = load_dataset(str(photos_dataset))
    with torch.inference_mode():  # the plain backbone on the images as captioning normalises them
        names = [ds.image_path(n) for n in ds.images]
        reference = spec.build("imagenet")(torch.from_numpy(np.stack([load_input(p, spec.preprocessing)
                                                                       for p in names]))).numpy()
    for engine in ("torch", "onnx"):
        cache = features.extract(spec, ds, "imagenet", batch_size=2, workers=1, device="cpu", show_progress=False,
                                 engine=engine)
        assert cache.complete and not cache.failed and cache.meta["engine"] == engine
        assert json.loads((cache.path / "meta.json").read_text())["engine"] == engine
        rows = np.array(cache.features)
        assert rows.dtype == np.float16 and rows.shape == (len(PHOTOS), spec.feature_dim)
        assert agree(reference, rows, FP16_STEP / 2 + 2.0**-14)  # float16 rounding of the stored rows, no more
        shutil.rmtree(cache.path)  # the next engine extracts afresh (the graph cache stays)


def test_graph_is_exported_once_with_a_symbolic_batch(monkeypatch, tmp_path):
    import onnx

    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    path = engines.export_graph(tiny, "none")
    assert path.is_file() and path.parent == tmp_path / "cache" / "graphs"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert graph.graph.output[0].type.tensor_type.shape.dim[0].dim_param

    def must_not_build(*args, **kwargs):
        raise AssertionError("a cached graph must not be exported again")

    monkeypatch.setattr(type(tiny), "build", must_not_build)
    assert engines.export_graph(tiny, "none") == path
    out = engines.make_extractor(tiny, "none", "onnx", "cpu")(np.zeros((5, 32, 32, 3), np.uint8))
    assert out.shape == (5, 8)  # batch 5 through a graph exported with batch 2


def test_the_grid_output_is_exported_and_run_the_same_way(monkeypatch, tmp_path):
    from dataclasses import replace

    from capcli.backbone import Grid

    def build_grid(weights):
        return tiny.builder(weights).conv  # [B, 8, 15, 15] before the pooling

    gridded = replace(tiny, grid=Grid(channels=8, height=15, width=15), grid_builder=build_grid)
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    pixels = engines.example_pixels(gridded, 3)
    out = {e: engines.make_extractor(gridded, "none", e, "cpu", output="grid")(pixels) for e in ("torch", "onnx")}
    assert out["onnx"].shape == (3, 8, 15, 15)
    assert agree(out["torch"].reshape(3, -1), out["onnx"].reshape(3, -1), FP16_STEP / 2)
    assert engines.graph_path(gridded, "none", "grid") != engines.graph_path(gridded, "none", "pooled")


def test_a_damaged_cached_graph_is_exported_again(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    path = engines.export_graph(tiny, "none")
    path.write_bytes(b"not a graph")
    x = engines.example_pixels(tiny, 3)
    out = engines.make_extractor(tiny, "none", "onnx", "cpu")(x)
    ref = engines.make_extractor(tiny, "none", "torch", "cpu")(x)
    assert agree(ref, out, FP16_STEP / 2) and path.stat().st_size > 100


def test_graph_key_follows_weights_preprocessing_output_and_opset(tmp_path):
    from dataclasses import replace

    from capcli.backbone import Preprocessing

    weights_file = tmp_path / "w.pt"
    weights_file.write_bytes(b"x")
    other_prep = replace(tiny, preprocessing=Preprocessing(input_size=32, resize=40))
    keys = {engines.graph_key(tiny, "none", "pooled", 18), engines.graph_key(tiny, "none", "pooled", 17),
            engines.graph_key(tiny, "none", "grid", 18), engines.graph_key(other_prep, "none", "pooled", 18),
            engines.graph_key(tiny, str(weights_file), "pooled", 18)}
    assert len(keys) == 5
    assert engines.graph_key(tiny, "none", "pooled", 18) == engines.graph_key(tiny, "none", "pooled", 18)


def test_auto_is_onnx_runtime_on_cpu_and_pytorch_on_cuda():
    assert engines.resolve_engine("auto", "cpu") == "onnx"
    assert engines.resolve_engine("auto", "cuda:0") == "torch"
    assert engines.resolve_engine("torch", "cpu") == "torch"
    assert engines.resolve_engine("onnx", "cpu") == "onnx"
    with pytest.raises(CapcliError, match="unknown engine 'tensorrt'"):
        engines.resolve_engine("tensorrt", "cpu")


def test_a_resumed_cache_records_both_engines(small_synthetic, monkeypatch, tmp_path):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    ds = load_dataset(str(small_synthetic))
    partial = features.extract(tiny, ds, "none", batch_size=10, workers=0, device="cpu", show_progress=False,
                               stop_after_batches=2, engine="torch")
    assert json.loads((partial.path / "meta.json").read_text())["engine"] == "torch"
    done = features.extract(tiny, ds, "none", batch_size=10, workers=0, device="cpu", show_progress=False,
                            engine="onnx")
    assert done.complete and done.meta["engine"] == "onnx+torch"
    assert json.loads((done.path / "meta.json").read_text())["engine"] == "onnx+torch"


def test_unknown_engine_is_one_clear_line(small_synthetic):
    result = CliRunner().invoke(app, ["features", "--backbone", "efficientnet_lite0", "--dataset",
                                      str(small_synthetic), "--weights", "none", "--engine", "tensorrt"])
    assert result.exit_code == 1
    assert "error: unknown engine 'tensorrt'" in result.stderr and "Traceback" not in result.output


def test_features_cli_extracts_with_onnx_runtime(small_synthetic, monkeypatch, tmp_path, _isolated_cache):
    if (_isolated_cache / "graphs").is_dir():  # a fresh feature cache, but no second export of the same graph
        shutil.copytree(_isolated_cache / "graphs", tmp_path / "cache" / "graphs")
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    args = ["features", "--backbone", "efficientnet_lite0", "--dataset", str(small_synthetic), "--weights", "none",
            "--engine", "onnx", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ds = load_dataset(str(small_synthetic))
    # The synthetic images are square: the CLI frames them with resize mode squash (auto), the cache says so.
    cache = feature_cache.open_cache(get_backbone("efficientnet_lite0").with_resize_mode("squash"), "none", ds)
    assert cache is not None and cache.meta["engine"] == "onnx"
    assert np.abs(np.asarray(cache.features, np.float32)).sum() > 0


@pytest.mark.parametrize("runs", [1, 3])
def test_cpu_extraction_runs_batches_at_once_and_puts_each_row_in_its_place(small_synthetic, monkeypatch, tmp_path,
                                                                              runs):
    from capcli.images import load_pixels

    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "cpu_runs", lambda: runs)
    extractor = engines.make_extractor(tiny, "none", "onnx", "cpu")
    assert extractor.runs == runs
    if runs > 1:  # one single-threaded session shared by the runs, and no loader process beside them
        assert extractor.session.get_session_options().intra_op_num_threads == 1
        assert features._default_workers("cpu", "onnx") == 0
    ds = load_dataset(str(small_synthetic))
    cache = features.extract(tiny, ds, "none", batch_size=7, device="cpu", show_progress=False, engine="onnx")
    pixels = np.stack([load_pixels(ds.image_path(n), tiny.preprocessing) for n in ds.images])
    reference = engines.make_extractor(tiny, "none", "torch", "cpu")(pixels)
    assert cache.complete and len(ds.images) > 7 * runs  # more batches than runs at once
    assert agree(reference, np.array(cache.features), FP16_STEP / 2 + 2.0**-14)


def test_an_extractor_hands_a_failed_run_to_whoever_waits_for_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "cpu_runs", lambda: 2)
    for engine in ("onnx", "torch"):
        future = engines.make_extractor(tiny, "none", engine, "cpu").submit(np.zeros((2, 5, 5), np.uint8))
        with pytest.raises(Exception):  # noqa: B017 (each engine words its shape error its own way)
            future.result(timeout=30)
