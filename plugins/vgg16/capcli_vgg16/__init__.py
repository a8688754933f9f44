"""capcli backbone plugin: VGG-16 from torchvision, 4096-d fc7 features; grid: conv5_3, 512 x 14x14.

Importing this module must stay torch-free (`capcli backbones` lists plugins without torch);
torch and torchvision are imported inside the builder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capcli.backbone import Backbone, Grid, Preprocessing, pretrained_model

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


backbone = Backbone(
    name=NAME,
    feature_dim=4096,
    preprocessing=Preprocessing(input_size=224, resize=256),
    builder=_build,
    weights_source="torchvision IMAGENET1K_V1 (download)",
    description="VGG-16 (torchvision), 4096-d fc7 activations; grid: conv5_3 after its ReLU",
    grid=Grid(channels=512, height=14, width=14),
    grid_builder=_build_grid,
)
