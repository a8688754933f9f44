"""A tiny, fast backbone for pipeline tests (not a plugin: tests pass it in directly)."""

from __future__ import annotations

import os
import time

from capcli.backbone import Backbone, Preprocessing


def _build(weights: str):
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2)

        def forward(self, x):
            delay = float(os.environ.get("TINY_BACKBONE_DELAY", "0"))
            if delay:
                time.sleep(delay)  # lets a test interrupt extraction mid-way
            return torch.relu(self.conv(x)).mean(dim=(2, 3))

    return Tiny()


tiny = Backbone(name="tiny", feature_dim=8, preprocessing=Preprocessing(input_size=32, resize=36), builder=_build,
                weights_source="random")


def _build_wide(weights: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(_build(weights), nn.Linear(8, 8192))


# Wide rows (8192 float16 = 16 KiB per image) for tests that need a feature file of some size.
wide = Backbone(name="wide", feature_dim=8192, preprocessing=tiny.preprocessing, builder=_build_wide,
                weights_source="random")
