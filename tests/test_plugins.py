"""The four bundled backbone plugins, reached through the registry like any third-party one."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from capcli.backbone import Backbone, Preprocessing
from capcli.errors import CapcliError
from capcli.images import load_input
from capcli.registry import get_backbone, plugins
from capcli.testing import check_backbone

IMAGES = Path(__file__).parent / "images"

# name: (feature_dim, input_size, resize)
EXPECTED = {
    "vgg16": (4096, 224, 256),
    "inceptionv3": (2048, 299, 342),
    "resnet152": (2048, 224, 256),
    "efficientnet_lite0": (1280, 224, 256),
}
# Sizes for the contract check on 2 CPU cores: global pooling makes the feature size independent of
# the input, so the heavy torchvision nets run small (Inception v3 accepts no less than 75).
CHECK_SIZE = {"vgg16": 64, "inceptionv3": 75, "resnet152": 64, "efficientnet_lite0": 224}
TORCHVISION = ["vgg16", "inceptionv3", "resnet152"]


@pytest.fixture(autouse=True)
def _all_plugins(monkeypatch):
    monkeypatch.delenv("CAPCLI_PLUGINS", raising=False)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_metadata(name):
    backbone = get_backbone(name)
    prep = backbone.preprocessing
    assert (backbone.feature_dim, prep.input_size, prep.resize) == EXPECTED[name]
    plugin = next(p for p in plugins() if p.name == name)
    assert (plugin.distribution, plugin.version) == ("capcli-" + name.replace("_", "-"), "0.1.0")
    assert backbone.description and backbone.weights_source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_contract_with_random_weights(name):
    check_backbone(get_backbone(name), weights="none", batch_size=2, image_size=CHECK_SIZE[name])


def test_random_weights_are_seeded():
    backbone = get_backbone("efficientnet_lite0")
    assert _same_weights(backbone.build("none"), backbone.build("none"))


# --- 'imagenet' for the torchvision ones: torch.hub's download, never reached in tests ------------


@pytest.mark.parametrize("name", TORCHVISION)
def test_imagenet_download_failure_is_one_clear_line(name, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CapcliError) as info:
        get_backbone(name).build("imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert name in message and "URLError" in message and "--weights none" in message


def test_inceptionv3_loads_a_torchvision_checkpoint_with_aux_logits(tmp_path):
    from torchvision.models import inception_v3

    # torchvision's ImageNet checkpoint has AuxLogits.* and fc.*: this file has the same layout.
    full = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    path = tmp_path / "inception_v3.pth"
    torch.save(full.state_dict(), path)
    module = get_backbone("inceptionv3").build(str(path))
    assert module.transform_input and module.AuxLogits is None
    x = torch.randn(2, 3, 75, 75)
    full.fc = torch.nn.Identity()
    with torch.inference_mode():
        assert torch.allclose(module(x), full.eval()(x), atol=1e-5)


# --- efficientnet_lite0: weights shipped offline, renamed from the efficientnet_pytorch layout ----


def _lite0():
    import capcli_efficientnet_lite0

    return capcli_efficientnet_lite0


def test_lite0_key_mapping_covers_every_parameter_with_matching_shapes():
    import timm

    lite0 = _lite0()
    shipped = torch.load(lite0.shipped_weights_path(), map_location="cpu", weights_only=True)
    converted = lite0.convert_state_dict(shipped)
    target = timm.create_model(lite0.TIMM_ARCH, pretrained=False, num_classes=1000).state_dict()
    assert len(converted) == len(shipped)  # no two source names collapse into one
    assert set(converted) == set(target)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in target.items()}


def _top_classes(model: torch.nn.Module, prep: Preprocessing, photo: str, k: int) -> list[int]:
    x = torch.from_numpy(load_input(IMAGES / photo, prep))[None]
    with torch.inference_mode():
        return model(x)[0].topk(k).indices.tolist()


@pytest.fixture(scope="module")
def lite0_classifier() -> torch.nn.Module:
    return _lite0().build_classifier("imagenet")


# ImageNet-1k indices: 281-285 domestic cats; 504 coffee mug, 967 espresso, 968 cup;
# 657 missile, 744 projectile, 812 space shuttle.
@pytest.mark.parametrize(
    ("photo", "classes", "k"),
    [
        ("chelsea.jpg", {281, 282, 283, 284, 285}, 1),
        ("coffee.jpg", {504, 967, 968}, 1),
        ("rocket.jpg", {657, 744, 812}, 3),  # top-1 wavers between missile and drilling platform
    ],
)
def test_lite0_imagenet_weights_recognise_real_photos(lite0_classifier, photo, classes, k):
    prep = get_backbone("efficientnet_lite0").preprocessing
    top = _top_classes(lite0_classifier, prep, photo, k)
    assert classes & set(top), f"{photo}: top-{k} ImageNet classes {top}, expected one of {sorted(classes)}"


def test_lite0_imagenet_features_are_the_classifier_pre_logits(lite0_classifier):
    backbone = get_backbone("efficientnet_lite0")
    x = torch.from_numpy(load_input(IMAGES / "coffee.jpg", backbone.preprocessing))[None]
    module = backbone.build("imagenet")
    with torch.inference_mode():
        features = module(x)
        logits = lite0_classifier.classifier(features)
        assert torch.allclose(logits, lite0_classifier(x), atol=1e-4)
    assert features.shape == (1, 1280) and bool((features >= 0).all())  # ReLU6 before the pool


def test_lite0_weights_path_in_timm_layout(tmp_path):
    full = _lite0().build_classifier("none")
    path = tmp_path / "lite0.pth"
    torch.save(full.state_dict(), path)
    module = get_backbone("efficientnet_lite0").build(str(path))
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        expected = full.forward_head(full.forward_features(x), pre_logits=True)
        assert torch.allclose(module(x), expected, atol=1e-6)


def test_lite0_weights_path_in_the_shipped_layout():
    backbone = get_backbone("efficientnet_lite0")
    from_path = backbone.build(_lite0().shipped_weights_path())
    shipped = backbone.build("imagenet")
    assert _same_weights(from_path, shipped)


def test_lite0_weights_file_that_does_not_fit(tmp_path):
    import timm

    ten_classes = timm.create_model(_lite0().TIMM_ARCH, pretrained=False, num_classes=10)
    path = tmp_path / "ten_classes.pth"
    torch.save(ten_classes.state_dict(), path)
    with pytest.raises(CapcliError, match=r"does not fit efficientnet_lite0: .*size mismatch"):
        get_backbone("efficientnet_lite0").build(str(path))


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(CapcliError, match="cannot read weights file"):
        get_backbone("resnet152").build(str(path))


# --- capcli.testing catches what it promises to catch ---------------------------------------------


def _tiny(builder, feature_dim: int = 4, **prep) -> Backbone:
    preprocessing = Preprocessing(**({"input_size": 16, "resize": 18} | prep))
    return Backbone(name="tiny", feature_dim=feature_dim, preprocessing=preprocessing, builder=builder)


def _conv_pool(channels: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )


class _Train(torch.nn.Sequential):
    def eval(self):  # ignores eval(): its BatchNorm would keep using batch statistics
        return self


class _Float64(torch.nn.Module):
    def forward(self, x):
        return x.double()


@pytest.mark.parametrize(
    ("builder", "prep", "message"),
    [
        (lambda w: _conv_pool(), {}, r"features \(2, 4\), expected \(2, 5\)"),
        (lambda w: torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten()), {}, r"\(2, 980\)"),
        (lambda w: torch.nn.Sequential(_conv_pool(5), _Float64()), {}, "features are torch.float64"),
        (lambda w: _Train(_conv_pool(5), torch.nn.BatchNorm1d(5)), {}, "must return eval mode"),
        (lambda w: _conv_pool(5), {"interpolation": "nearest"}, "interpolation 'nearest' unknown"),
        (lambda w: _conv_pool(5), {"resize": 8}, "must be an int >= input_size 16"),
        (lambda w: _conv_pool(5), {"std": (0.2, 0.0, 0.2)}, "std must be > 0"),
    ],
)
def test_check_backbone_rejects_contract_violations(builder, prep, message):
    with pytest.raises(AssertionError, match=message):
        check_backbone(_tiny(builder, feature_dim=5, **prep))


def test_check_backbone_accepts_a_module_with_trainable_parameters():
    check_backbone(_tiny(lambda w: _conv_pool(5).requires_grad_(True), feature_dim=5), batch_size=3)


def test_check_backbone_catches_batch_mixing():
    class MixesBatch(torch.nn.Module):
        def forward(self, x):  # subtracts the batch mean: each sample depends on the others
            pooled = x.mean((2, 3))
            return pooled - pooled.mean(0, keepdim=True)

    with pytest.raises(AssertionError, match="sample 0 alone differs"):
        check_backbone(_tiny(lambda w: MixesBatch(), feature_dim=3))
