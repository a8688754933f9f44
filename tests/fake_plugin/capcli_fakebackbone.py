"""A throwaway third-party backbone plugin: tiny, torch-free at import, for the registry tests.

The tests copy this file next to a hand-written `*.dist-info` folder in a temporary directory,
which is all `importlib.metadata` needs to see an installed distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capcli.backbone import Backbone, Preprocessing

if TYPE_CHECKING:
    from torch import nn

FEATURE_DIM = 8


def _build(weights: str) -> nn.Module:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, FEATURE_DIM, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


backbone = Backbone(
    name="fake",
    feature_dim=FEATURE_DIM,
    preprocessing=Preprocessing(input_size=32, resize=36),
    builder=_build,
    weights_source="random only",
    description="a tiny conv net for tests",
)

# Registered under its own entry point to show that a wrong object is reported, not fatal.
not_a_backbone = {"name": "fakewrongtype", "feature_dim": 8}
