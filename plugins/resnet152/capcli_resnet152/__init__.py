"""capcli backbone plugin: ResNet-152 from torchvision, 2048-d average-pooled features; grid: layer4, 2048 x 7x7.
Split point for fine-tuning: before layer4 (the trunk gives layer3's 1024 x 14x14; the tail is layer4, 15 M
parameters); classifier: the ImageNet head (average pool + fc) on the grid.

Importing this module must stay torch-free (`capcli backbones` lists plugins without torch);
torch and torchvision are imported inside the builder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capcli.backbone import Backbone, Classifier, Grid, Preprocessing, Split, pretrained_model

if TYPE_CHECKING:
    from torch import nn

NAME = "resnet152"


def _full_model(weights: str) -> nn.Module:
    from torchvision.models import ResNet152_Weights, resnet152

    return pretrained_model(NAME, weights, lambda: resnet152(weights=None), ResNet152_Weights.IMAGENET1K_V1.url)


def _build(weights: str) -> nn.Module:
    from torch import nn

    model = _full_model(weights)
    # The head goes after loading, so a full-model state dict (fc included) fits.
    model.fc = nn.Identity()
    return model


def _build_grid(weights: str) -> nn.Module:
    from torch import nn

    model = _full_model(weights)
    # Everything up to layer4, i.e. without the global average pool and fc.
    return nn.Sequential(*list(model.children())[:-2])


def _build_split(weights: str) -> tuple[nn.Module, nn.Module]:
    from torch import nn

    model = _full_model(weights)
    trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3)
    return trunk, model.layer4


def _build_head(weights: str) -> nn.Module:
    from torch import nn

    model = _full_model(weights)
    return nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)


backbone = Backbone(
    name=NAME,
    feature_dim=2048,
    preprocessing=Preprocessing(input_size=224, resize=256),
    builder=_build,
    weights_source="torchvision IMAGENET1K_V1 (download)",
    description="ResNet-152 (torchvision), 2048-d global average pool; grid: layer4",
    grid=Grid(channels=2048, height=7, width=7),
    grid_builder=_build_grid,
    splits=(Split("layer4", Grid(channels=1024, height=14, width=14), _build_split, "tail: layer4"),),
    classifier=Classifier(labels="imagenet-1k", classes=1000, builder=_build_head),
)
