"""capcli backbone plugin: VGG-16 from torchvision, 4096-d fc7 features; grid: conv5_3, 512 x 14x14.
Split point for fine-tuning: before conv5_1 (the trunk ends with pool4, 512 x 14x14; the tail is conv5_1-conv5_3
with their ReLUs, 7.1 M parameters); classifier: the ImageNet head (pool5, the classifier's three layers) on the grid.

Importing this module must stay torch-free (`capcli backbones` lists plugins without torch);
torch and torchvision are imported inside the builder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capcli.backbone import Backbone, Classifier, Grid, Preprocessing, Split, pretrained_model

if TYPE_CHECKING:
    from torch import nn

NAME = "vgg16"


def _full_model(weights: str) -> nn.Module:
    from torchvision.models import VGG16_Weights, vgg16

    return pretrained_model(NAME, weights, lambda: vgg16(weights=None), VGG16_Weights.IMAGENET1K_V1.url)


def _build(weights: str) -> nn.Module:
    model = _full_model(weights)
    # fc7 = the classifier without its last Linear: Linear-ReLU-Dropout-Linear-ReLU-Dropout, i.e.
    # the ReLU'd fc7 activations (the trailing Dropout is the identity in eval mode). Cut after
    # loading, so a full-model state dict (fc8 included) fits.
    model.classifier = model.classifier[:-1]
    return model


def _build_grid(weights: str) -> nn.Module:
    # features[28] is conv5_3, [29] its ReLU, [30] the last max pool: stop before the pool, at 14x14.
    return _full_model(weights).features[:30]


def _build_split(weights: str) -> tuple[nn.Module, nn.Module]:
    features = _full_model(weights).features
    return features[:24], features[24:30]  # [24] is conv5_1, after pool4


def _build_head(weights: str) -> nn.Module:
    from torch import nn

    model = _full_model(weights)
    return nn.Sequential(model.features[30], model.avgpool, nn.Flatten(1), model.classifier)


backbone = Backbone(
    name=NAME,
    feature_dim=4096,
    preprocessing=Preprocessing(input_size=224, resize=256),
    builder=_build,
    weights_source="torchvision IMAGENET1K_V1 (download)",
    description="VGG-16 (torchvision), 4096-d fc7 activations; grid: conv5_3 after its ReLU",
    grid=Grid(channels=512, height=14, width=14),
    grid_builder=_build_grid,
    splits=(Split("features.24", Grid(channels=512, height=14, width=14), _build_split, "tail: conv5_1 to conv5_3"),),
    classifier=Classifier(labels="imagenet-1k", classes=1000, builder=_build_head),
)
