"""Photos seen as the model was trained (resize modes) and a backbone whose tail is fine-tuned on cached trunk rows."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capcli.backbone import Backbone, Grid, Preprocessing, Split
from capcli.errors import CapcliError
from capcli.features.cache import cache_key
from capcli.images import auto_resize_mode, load_pixels, to_pixels
from capcli.model import checkpoint
from capcli.registry import get_backbone
from capcli.testing import check_split
from capcli.train.batches import swap_words
from capcli.train.config import TrainConfig
from capcli.train.loop import train

PHOTO = Path(__file__).parent / "images" / "chelsea.jpg"  # 451 x 300: not square


def _config(run, dataset, **overrides) -> TrainConfig:
    base = TrainConfig(backbone="efficientnet_lite0", dataset=str(dataset), weights="imagenet", out=str(run),
                       epochs=2, batch_size=32, embed_dim=32, hidden_dim=64, context_dim=32, attention_dim=32,
                       threshold=2, val_sample=20, device="cpu", workers=0, decoder="attention")
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory, small_synthetic) -> Path:
    """Two epochs of the attention decoder with the Lite0 tail (split blocks.6) trained too, and flips."""
    out = tmp_path_factory.mktemp("runs") / "finetuned"
    return train(_config(out, small_synthetic, finetune=True, flip=True), show_progress=False)


# --- resize modes -----------------------------------------------------------------------------------------


def test_squash_frames_a_photo_as_its_squashed_copy_does(tmp_path):
    prep = get_backbone("efficientnet_lite0").preprocessing
    photo = Image.open(PHOTO).convert("RGB")
    copy = photo.resize((224, 224), Image.Resampling.BICUBIC)  # how square training copies are made
    seen_copy = to_pixels(copy, prep).astype(float)
    squashed = to_pixels(photo, prep.with_resize_mode("squash")).astype(float)
    cropped = to_pixels(photo, prep).astype(float)
    assert np.abs(squashed - seen_copy).mean() < 6  # the same framing, resampled once instead of twice
    assert np.abs(cropped - seen_copy).mean() > 3 * np.abs(squashed - seen_copy).mean()
    # On a square photo the two modes are the same pixels: square training images cannot tell them apart.
    assert np.array_equal(to_pixels(copy, prep), to_pixels(copy, prep.with_resize_mode("squash")))


def test_auto_resize_mode_is_squash_for_square_training_images_only(tmp_path):
    for i, size in enumerate([(64, 64), (80, 80), (90, 60)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
    square = [tmp_path / "0.png", tmp_path / "1.png"]
    assert auto_resize_mode(square)[0] == "squash"
    assert auto_resize_mode([*square, tmp_path / "2.png"]) == ("crop", "2 of 3 training images looked at are square")


def test_an_unknown_resize_mode_is_one_clear_error():
    with pytest.raises(CapcliError, match="unknown resize mode 'stretch'; one of crop, squash"):
        get_backbone("efficientnet_lite0").with_resize_mode("stretch")


def test_the_cache_key_separates_resize_modes_split_points_and_flips():
    lite = get_backbone("efficientnet_lite0")
    keys = {
        cache_key(backbone, "imagenet", ["a.jpg"], "fp", "/data", output, flip)
        for backbone in (lite, lite.with_resize_mode("squash"))
        for output in ("grid", "trunk:blocks.6", "trunk:blocks.5")
        for flip in (False, True)
    }
    assert len(keys) == 12


def test_a_run_records_its_resize_mode_and_a_bundle_applies_it(finetuned_run, small_synthetic, tmp_path):
    from capcli.bundle.build import export
    from capcli.runtime.captioner import caption_images, open_captioner

    ckpt = checkpoint.load(finetuned_run / "best.pt")
    assert ckpt["train_config"]["resize_mode"] == "squash"  # the synthetic images are square
    assert ckpt["preprocessing"]["resize_mode"] == "squash"
    bundle = export(finetuned_run, tmp_path / "bundle")
    meta = json.loads((bundle / "capcli.json").read_text())
    assert meta["preprocessing"]["resize_mode"] == "squash"
    # Both runtimes read and frame a non-square photo the same way, as the bundle says.
    onnx, torch_ = open_captioner(bundle, "onnx", "cpu"), open_captioner(finetuned_run, "torch")
    assert onnx.preprocessing == torch_.preprocessing and onnx.preprocessing.resize_mode == "squash"
    captions = [caption_images(c, [PHOTO])[0].caption for c in (onnx, torch_)]
    assert captions[0] == captions[1]


def test_the_server_frames_an_upload_as_the_bundle_says():
    import io

    from capcli.images import decode_pixels

    prep = get_backbone("efficientnet_lite0").preprocessing.with_resize_mode("squash")
    served = decode_pixels(io.BytesIO(PHOTO.read_bytes()), "upload", prep)
    assert np.array_equal(served, load_pixels(PHOTO, prep))
    assert not np.array_equal(served, load_pixels(PHOTO, replace(prep, resize_mode="crop")))


# --- fine-tuning --------------------------------------------------------------------------------------------


def test_a_finetuned_run_changes_the_tail_and_keeps_batchnorm_statistics(finetuned_run):
    ckpt = checkpoint.load(finetuned_run / "best.pt")
    assert ckpt["tail"]["split"] == "blocks.6" and ckpt["train_config"]["finetune"] is True
    _, original = get_backbone("efficientnet_lite0").build_split("imagenet", "blocks.6")
    before = original.state_dict()
    moved = [k for k, v in ckpt["tail"]["state"].items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in moved)
    assert not any("running_" in k for k in moved)  # BatchNorm statistics stay ImageNet's


def test_a_finetuned_run_exports_with_parity_and_its_tail(finetuned_run, tmp_path):
    from capcli.bundle.build import export

    bundle = export(finetuned_run, tmp_path / "bundle")
    meta = json.loads((bundle / "capcli.json").read_text())
    assert meta["finetuned"] == {"split": "blocks.6"}
    assert meta["parity"]["greedy_captions_equal"] is True
    assert meta["parity"]["encoder_max_abs_diff"] < 1e-3
    # The graph holds the tuned tail: a bundle of the same decoder over the untouched backbone differs.
    ckpt = checkpoint.load(finetuned_run / "best.pt")
    frozen = {k: v for k, v in ckpt.items() if k != "tail"}
    frozen["train_config"] = {**ckpt["train_config"], "finetune": False}  # else it is a damaged fine-tuned run
    torch.save(frozen, tmp_path / "frozen.pt")
    other = export(tmp_path / "frozen.pt", tmp_path / "frozen-bundle")
    assert (bundle / "encoder.onnx").read_bytes() != (other / "encoder.onnx").read_bytes()


def test_a_finetuned_run_resumes_with_its_tail(finetuned_run, small_synthetic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finetuned_run, run)
    train(_config(run, small_synthetic, finetune=True, flip=True, epochs=3, resume=True), show_progress=False)
    last = checkpoint.load(run / "last.pt")
    assert len(last["history"]) == 3 and last["tail"]["split"] == "blocks.6"
    with pytest.raises(CapcliError, match="--finetune"):  # what it learns cannot change on resume
        train(_config(run, small_synthetic, epochs=4, resume=True, finetune=False, given=("finetune",)),
              show_progress=False)


def test_scst_works_on_a_finetuned_run(finetuned_run, tmp_path):
    from capcli.train.scst import ScstConfig, scst

    run = tmp_path / "run"
    shutil.copytree(finetuned_run, run)
    scst(ScstConfig(run=str(run), epochs=1, batch_size=8, val_sample=10, device="cpu"), show_progress=False)
    history = [json.loads(line) for line in (run / "scst" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert checkpoint.load(run / "scst" / "last.pt")["tail"]["split"] == "blocks.6"


def test_a_backbone_without_a_split_trains_frozen_and_refuses_finetune(small_synthetic, tmp_path, monkeypatch):
    import capcli.registry

    lite = get_backbone("efficientnet_lite0")
    plain = replace(lite, name="plain", splits=(), classifier=None)
    monkeypatch.setattr(capcli.registry, "get_backbone", lambda name: plain if name == "plain" else lite)
    with pytest.raises(CapcliError, match="declares no split point, so its layers cannot be fine-tuned"):
        train(_config(tmp_path / "ft", small_synthetic, backbone="plain", finetune=True), show_progress=False)
    assert not (tmp_path / "ft").exists()
    run = train(_config(tmp_path / "frozen", small_synthetic, backbone="plain", epochs=1), show_progress=False)
    assert "tail" not in checkpoint.load(run / "best.pt")


@pytest.mark.parametrize("tail", ["garbage", {"state": {}}, {"split": "blocks.6", "state": [1, 2]}, {}, None])
def test_a_checkpoint_with_a_damaged_tail_is_one_clear_error(tmp_path, tail):
    """A tail that is not {split, state}, or none in a fine-tuned run's checkpoint (which would caption silently
    with the untouched tail's grid): refused when the checkpoint is read, by export, --runtime torch, scst and
    --resume alike."""
    ckpt = {"format": checkpoint.FORMAT, "train_config": {"finetune": True},
            **({"tail": tail} if tail is not None else {})}
    torch.save(ckpt, tmp_path / "best.pt")
    with pytest.raises(CapcliError, match="tuned tail.*the checkpoint is damaged"):
        checkpoint.load(tmp_path)


def test_an_unknown_split_names_the_choices():
    with pytest.raises(CapcliError, match="has no split 'blocks.9'; available: blocks.6, blocks.5"):
        get_backbone("efficientnet_lite0").split("blocks.9")


def test_mirrored_captions_swap_left_and_right():
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 6, 5, 8, 2]])  # 5 = left, 6 = right
    out = swap_words(tokens, torch.tensor([True, False]), [(5, 6)])
    assert out.tolist() == [[1, 6, 5, 7, 2], [1, 6, 5, 8, 2]]


def test_the_contract_check_catches_a_tail_that_does_not_continue_the_trunk():
    from torch import nn

    def grid(weights):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2))

    def wrong_split(weights):
        model = grid(weights)
        return model[:2], nn.Conv2d(4, 6, 3, stride=2)  # a fresh layer, not the model's own

    backbone = Backbone(name="cut", feature_dim=6, preprocessing=Preprocessing(32, 36),
                        builder=lambda w: nn.Sequential(grid(w), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                        grid=Grid(6, 7, 7), grid_builder=grid,
                        splits=(Split("conv2", Grid(4, 15, 15), wrong_split),))
    with pytest.raises(AssertionError, match="tail\\(trunk\\(x\\)\\) differs from the grid"):
        check_split(backbone)
