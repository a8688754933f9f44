"""capcli backbone plugin: Inception v3 from torchvision, 2048-d average-pooled features; grid: Mixed_7c, 2048 x 8x8.
Split point for fine-tuning: before Mixed_7b (the trunk gives Mixed_7a's 1280 x 8x8; the tail is Mixed_7b and
Mixed_7c, 11 M parameters); classifier: the ImageNet head (average pool + fc) on the grid.

Importing this module must stay torch-free (`capcli backbones` lists plugins without torch);
torch and torchvision are imported inside the builder.

Input normalisation: torchvision's ImageNet weights are Google's original ones, trained on
inputs scaled to [-1, 1]. torchvision builds that model with `transform_input=True`: it takes
inputs normalised with the ImageNet mean/std (like every other torchvision model) and re-maps
them to [-1, 1] itself. We always build with `transform_input=True` and declare the ImageNet
mean/std below, so the same preprocessing is right for 'imagenet', 'none' and a local file.
The smallest input the architecture accepts is 75x75.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from capcli.backbone import Backbone, Classifier, Grid, Preprocessing, Split, pretrained_model

if TYPE_CHECKING:
    from torch import nn

NAME = "inceptionv3"
MIN_INPUT_SIZE = 75


def _drop_aux_logits(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-time hook: the auxiliary classifier only helps training, so its weights are ignored.

    torchvision's checkpoint has them; a user's file may or may not, and either must load.
    """
    for key in [k for k in state_dict if k.startswith(prefix + "AuxLogits.")]:
        del state_dict[key]


def _full_model(weights: str) -> nn.Module:
    from torchvision.models import Inception_V3_Weights, inception_v3

    def build() -> nn.Module:
        # No aux logits at inference; transform_input as the ImageNet weights expect (module docstring).
        model = inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=True)
        model.register_load_state_dict_pre_hook(_drop_aux_logits)
        return model

    return pretrained_model(NAME, weights, build, Inception_V3_Weights.IMAGENET1K_V1.url)


def _build(weights: str) -> nn.Module:
    from torch import nn

    model = _full_model(weights)
    # The head goes after loading, so a full-model state dict (fc included) fits.
    model.fc = nn.Identity()
    return model


_HEAD = ("avgpool", "dropout", "fc", "AuxLogits")


def _build_grid(weights: str) -> nn.Module:
    """Mixed_7c's output: the network's own layers in order, without the pool and the head."""
    from torch import nn
    from torchvision.models.inception import Inception3

    class TransformInput(nn.Module):
        """Inception3's own re-mapping of ImageNet-normalised input to [-1, 1] (a method, not a child module)."""

        transform_input = True

        def forward(self, x):
            return Inception3._transform_input(self, x)

    model = _full_model(weights)
    body = [module for name, module in model.named_children() if name not in _HEAD]
    return nn.Sequential(TransformInput(), *body)


_TAIL = ("Mixed_7b", "Mixed_7c")


def _build_split(weights: str) -> tuple[nn.Module, nn.Module]:
    grid = _build_grid(weights)
    cut = len(grid) - len(_TAIL)
    return grid[:cut], grid[cut:]


def _build_head(weights: str) -> nn.Module:
    from torch import nn

    model = _full_model(weights)
    return nn.Sequential(model.avgpool, model.dropout, nn.Flatten(1), model.fc)


backbone = Backbone(
    name=NAME,
    feature_dim=2048,
    preprocessing=Preprocessing(input_size=299, resize=342),
    builder=_build,
    weights_source="torchvision IMAGENET1K_V1 (download)",
    description="Inception v3 (torchvision), 2048-d global average pool; transform_input, no aux logits; "
    "grid: Mixed_7c",
    grid=Grid(channels=2048, height=8, width=8),
    grid_builder=_build_grid,
    splits=(Split("Mixed_7b", Grid(channels=1280, height=8, width=8), _build_split, "tail: Mixed_7b and Mixed_7c"),),
    classifier=Classifier(labels="imagenet-1k", classes=1000, builder=_build_head),
)
