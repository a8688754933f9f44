"""The four bundled backbone plugins, reached through the registry like any third-party one."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from capcli.backbone import Backbone, Grid, Preprocessing
from capcli.errors import CapcliError
from capcli.images import load_input
from capcli.registry import get_backbone, plugins
from capcli.testing import check_backbone, check_grid

IMAGES = Path(__file__).parent / "images"

# name: (feature_dim, input_size, resize)
EXPECTED = {
    "vgg16": (4096, 224, 256),
    "inceptionv3": (2048, 299, 342),
    "resnet152": (2048, 224, 256),
    "efficientnet_lite0": (1280, 224, 256),
    "efficientnet_lite1": (1280, 240, 272),
    "efficientnet_lite2": (1280, 260, 292),
}
# name: the grid before pooling (channels, height, width) at the backbone's input size
EXPECTED_GRID = {
    "vgg16": (512, 14, 14),
    "inceptionv3": (2048, 8, 8),
    "resnet152": (2048, 7, 7),
    "efficientnet_lite0": (1280, 7, 7),
    "efficientnet_lite1": (1280, 8, 8),
    "efficientnet_lite2": (1280, 9, 9),
}
# Sizes for the contract check on 2 CPU cores: global pooling makes the feature size independent of
# the input, so the heavy torchvision nets run small (Inception v3 accepts no less than 75).
CHECK_SIZE = {"vgg16": 64, "inceptionv3": 75, "resnet152": 64, "efficientnet_lite0": 224, "efficientnet_lite1": 240,
              "efficientnet_lite2": 260}
# Lite1 and Lite2 come in the Lite0 plugin's distribution: one weights conversion serves the three.
DISTRIBUTION = {"efficientnet_lite1": "capcli-efficientnet-lite0", "efficientnet_lite2": "capcli-efficientnet-lite0"}
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
    distribution = DISTRIBUTION.get(name, "capcli-" + name.replace("_", "-"))
    assert (plugin.distribution, plugin.version) == (distribution, "0.1.0")
    assert backbone.description and backbone.weights_source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_contract_with_random_weights(name):
    check_backbone(get_backbone(name), weights="none", batch_size=2, image_size=CHECK_SIZE[name])


@pytest.mark.parametrize("name", sorted(EXPECTED_GRID))
def test_grid_declared_and_exact_at_the_input_size(name):
    backbone = get_backbone(name)
    assert backbone.has_grid and backbone.grid == Grid(*EXPECTED_GRID[name])
    check_grid(backbone, weights="none", batch_size=1)  # at the real input size: H x W checked exactly


@pytest.mark.parametrize("name", ["resnet152", "inceptionv3", "efficientnet_lite0"])
def test_grid_is_what_the_pooled_features_average(name):
    backbone = get_backbone(name)
    x = torch.randn(2, 3, CHECK_SIZE[name], CHECK_SIZE[name])
    with torch.inference_mode():
        pooled, grid = backbone.build("none")(x), backbone.build_grid("none")(x)
    assert torch.allclose(grid.mean((2, 3)), pooled, atol=1e-4 * max(1.0, float(pooled.abs().max())))


def test_vgg16_grid_feeds_its_fc7():
    backbone = get_backbone("vgg16")
    x = torch.randn(2, 3, 64, 64)
    full = backbone.build("none")
    with torch.inference_mode():
        grid = backbone.build_grid("none")(x)
        from_grid = full.classifier(torch.flatten(full.avgpool(full.features[30](grid)), 1))
        assert torch.allclose(from_grid, full(x), atol=1e-5)
    assert grid.shape == (2, 512, 4, 4) and bool((grid >= 0).all())  # conv5_3 after its ReLU


def test_a_backbone_without_a_grid_still_works_pooled_and_names_itself_for_attention():
    backbone = _tiny(lambda w: _conv_pool(5), feature_dim=5)
    check_backbone(backbone)
    assert not backbone.has_grid
    with pytest.raises(CapcliError, match="backbone 'tiny' declares no feature grid.*--decoder pooled"):
        backbone.build_grid("none")


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


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_key_mapping_covers_every_parameter_with_matching_shapes(name):
    import timm

    variant = _lite0().VARIANTS[name]
    shipped = torch.load(_lite0().shipped_weights_path(variant), map_location="cpu", weights_only=True)
    converted = _lite0().convert_state_dict(shipped, variant)
    target = timm.create_model(variant.timm_arch, pretrained=False, num_classes=1000).state_dict()
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


def test_lite2_imagenet_weights_recognise_a_real_photo():
    lite = _lite0()
    classifier = lite.build_classifier("imagenet", lite.VARIANTS["efficientnet_lite2"])
    top = _top_classes(classifier, get_backbone("efficientnet_lite2").preprocessing, "chelsea.jpg", 1)
    assert set(top) <= {281, 282, 283, 284, 285}, f"chelsea.jpg: top-1 ImageNet class {top}, expected a cat"


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


def _grid_tiny(grid_builder, grid: Grid, **fields) -> Backbone:
    return Backbone(name="tiny", feature_dim=5, preprocessing=Preprocessing(input_size=16, resize=18),
                    builder=lambda w: _conv_pool(5), grid=grid, grid_builder=grid_builder, **fields)


def _conv(channels: int = 5, stride: int = 2) -> torch.nn.Module:
    return torch.nn.Conv2d(3, channels, 3, stride=stride, padding=1)  # 16 -> 8 at stride 2


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        (_grid_tiny(lambda w: _conv(), grid=Grid(5, 8, 8)), None),
        (_grid_tiny(lambda w: _conv(4), grid=Grid(5, 8, 8)), r"grid \(2, 4, 8, 8\), expected \[2, 5, H, W\]"),
        (_grid_tiny(lambda w: _conv(), grid=Grid(5, 7, 7)), r"grid \(2, 5, 8, 8\) at the input size, declared"),
        (_grid_tiny(lambda w: _conv_pool(5), grid=Grid(5, 1, 1)), "expected 4 dims"),
        (_grid_tiny(lambda w: _Train(_conv(), torch.nn.BatchNorm2d(5)), grid=Grid(5, 8, 8)),
         r"build_grid\(\) must return eval mode"),
        (_grid_tiny(None, grid=Grid(5, 8, 8)), "grid and grid_builder must be given together"),
        (_grid_tiny(lambda w: _conv(), grid=Grid(5, 0, 8)), "grid height must be an int > 0"),
        (_grid_tiny(lambda w: torch.nn.Sequential(_conv(), _Float64()), grid=Grid(5, 8, 8)),
         "grid is torch.float64"),
    ],
)
def test_check_backbone_checks_the_grid(backbone, message):
    if message is None:
        check_backbone(backbone)
        return
    with pytest.raises(AssertionError, match=message):
        check_backbone(backbone)


def test_check_grid_catches_batch_mixing_in_the_grid():
    class MixesBatch(torch.nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    with pytest.raises(AssertionError, match="sample 0 alone differs"):
        check_backbone(_grid_tiny(lambda w: torch.nn.Sequential(_conv(3), MixesBatch()), grid=Grid(3, 8, 8)))


def test_check_backbone_accepts_a_module_with_trainable_parameters():
    check_backbone(_tiny(lambda w: _conv_pool(5).requires_grad_(True), feature_dim=5), batch_size=3)


def test_check_backbone_catches_batch_mixing():
    class MixesBatch(torch.nn.Module):
        def forward(self, x):  # subtracts the batch mean: each sample depends on the others
            pooled = x.mean((2, 3))
            return pooled - pooled.mean(0, keepdim=True)

    with pytest.raises(AssertionError, match="sample 0 alone differs"):
        check_backbone(_tiny(lambda w: MixesBatch(), feature_dim=3))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_weights_package_missing_is_one_clear_error(monkeypatch, name):
    import sys

    variant = _lite0().VARIANTS[name]
    monkeypatch.setitem(sys.modules, variant.weights_module, None)  # import raises ImportError
    with pytest.raises(CapcliError, match=rf"come from the package {variant.weights_package}, which is not installed"):
        get_backbone(name).build("imagenet")
