"""A reusable contract check for backbone plugins: call `check_backbone` from your plugin's tests.

    from capcli.testing import check_backbone
    from my_plugin import backbone

    def test_contract():
        check_backbone(backbone, image_size=64)  # random weights, small input: fast

Every violation raises AssertionError with a message naming the backbone and what is wrong.
Importing this module does not import torch; running the check does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from capcli.backbone import RESIZE_MODES, Backbone, Classifier, Grid, Split

if TYPE_CHECKING:
    import torch

INPUT_SEED = 1234


def check_backbone(
    backbone: Backbone,
    weights: str = "none",
    batch_size: int = 2,
    image_size: int | None = None,
    atol: float = 1e-4,
) -> None:
    """Check a backbone against the plugin contract; AssertionError on the first violation.

    - metadata: name, feature_dim > 0, preprocessing (sizes, 3-channel mean/std, interpolation);
    - `build(weights)` returns an `nn.Module` in eval mode;
    - a float batch [B,3,S,S] gives features [B, feature_dim], float32, finite, input-dependent;
    - batch independence: each sample's features alone equal its row in the batch (within atol,
      relative to the features' scale);
    - eval determinism: two runs on the same batch agree; the forward runs without autograd;
    - when the backbone declares a grid: `build_grid(weights)` passes the same checks with a grid
      [B, C, H, W] as output; C is the declared channels, and at the backbone's input_size H x W is
      the declared grid (at another size only H, W >= 1 is checked);
    - for each declared split: trunk and tail in eval mode, the trunk's output is the declared trunk grid at the
      input size, tail(trunk(x)) equals the grid (within atol), and the tail has parameters to train;
    - when the backbone declares a classifier: on the grid it gives [B, classes] finite logits.

    `image_size` defaults to the backbone's input_size. A smaller one keeps tests fast where the
    architecture allows it (global pooling makes the feature size independent of S); it must be
    large enough for every downsampling stage: Inception v3 needs S >= 75.
    """
    check_metadata(backbone)
    _require(batch_size >= 1, backbone, f"batch_size must be >= 1, got {batch_size}")
    size = image_size if image_size is not None else backbone.input_size
    batch = _random_batch(batch_size, size)
    module = _check_build(backbone, backbone.build, weights)
    features = _forward(module, batch, backbone)
    _check_features(features, backbone, batch_size)
    _check_repeatable(module, batch, features, backbone, atol)
    if backbone.grid is not None:
        check_grid(backbone, weights, batch_size, size, atol)
    for split in backbone.splits:
        check_split(backbone, split.name, weights, batch_size, size, atol)
    if backbone.classifier is not None:
        check_classifier(backbone, weights, batch_size, size)


def check_split(
    backbone: Backbone, name: str | None = None, weights: str = "none", batch_size: int = 2,
    image_size: int | None = None, atol: float = 1e-4,
) -> None:
    """The split part of the contract for one split (None: the default one; see `check_backbone`)."""
    _check_split_metadata(backbone)
    split = backbone.split(name)
    size = image_size if image_size is not None else backbone.input_size
    batch = _random_batch(batch_size, size)
    trunk, tail = backbone.build_split(weights, split.name)
    for part, module in (("trunk", trunk), ("tail", tail)):
        training = [n or "<root>" for n, m in module.named_modules() if m.training]
        _require(not training, backbone, f"split '{split.name}': the {part} must be in eval mode; training: "
                                         f"{training[:5]}")
    _require(any(True for _ in tail.parameters()), backbone, f"split '{split.name}': the tail has no parameters")
    middle = _forward(trunk, batch, backbone)
    if size == backbone.input_size:
        expected = (batch_size, split.trunk.channels, split.trunk.height, split.trunk.width)
        _require(tuple(middle.shape) == expected, backbone,
                 f"split '{split.name}': trunk output {tuple(middle.shape)}, declared {expected}")
    joined = _forward(tail, middle, backbone)
    grid = _forward(backbone.build_grid(weights), batch, backbone)
    _require(tuple(joined.shape) == tuple(grid.shape) and _close(joined, grid, atol), backbone,
             f"split '{split.name}': tail(trunk(x)) differs from the grid "
             f"({tuple(joined.shape)} vs {tuple(grid.shape)})")


def check_classifier(
    backbone: Backbone, weights: str = "none", batch_size: int = 2, image_size: int | None = None
) -> None:
    """The classifier part of the contract (see `check_backbone`)."""
    import torch

    head = backbone.classifier
    _require(isinstance(head, Classifier), backbone, f"classifier is {type(head).__name__}, not a Classifier")
    assert head is not None
    _require(isinstance(head.labels, str) and head.labels != "", backbone, "classifier labels must be named")
    _require(isinstance(head.classes, int) and head.classes > 1, backbone, "classifier classes must be an int > 1")
    size = image_size if image_size is not None else backbone.input_size
    grid = _forward(backbone.build_grid(weights), _random_batch(batch_size, size), backbone)
    logits = _forward(_check_build(backbone, backbone.build_classifier, weights), grid, backbone)
    _require(tuple(logits.shape) == (batch_size, head.classes), backbone,
             f"classifier gave {tuple(logits.shape)}, expected {(batch_size, head.classes)}")
    _require(bool(torch.isfinite(logits).all()), backbone, "classifier logits contain NaN or inf")


def _check_split_metadata(backbone: Backbone) -> None:
    _require(isinstance(backbone.splits, tuple), backbone, "splits must be a tuple of capcli.backbone.Split")
    names = [getattr(s, "name", None) for s in backbone.splits]
    _require(len(set(names)) == len(names), backbone, f"split names repeat: {names}")
    for split in backbone.splits:
        _require(isinstance(split, Split), backbone, f"a split is a {type(split).__name__}, not a Split")
        _require(isinstance(split.name, str) and split.name != "", backbone, "a split needs a name")
        _require(isinstance(split.trunk, Grid), backbone, f"split '{split.name}': trunk must be a Grid")
        _require(callable(split.builder), backbone, f"split '{split.name}': builder is not callable")
    _require(not backbone.splits or backbone.grid is not None, backbone, "splits need a grid (the tail's output)")


def check_grid(
    backbone: Backbone, weights: str = "none", batch_size: int = 2, image_size: int | None = None, atol: float = 1e-4
) -> None:
    """The grid part of the contract alone (see `check_backbone`)."""
    _check_grid_metadata(backbone)
    _require(backbone.grid is not None, backbone, "declares no grid")
    size = image_size if image_size is not None else backbone.input_size
    batch = _random_batch(batch_size, size)
    module = _check_build(backbone, backbone.build_grid, weights)
    grid = _forward(module, batch, backbone)
    _check_grid(grid, backbone, batch_size, exact=size == backbone.input_size)
    _check_repeatable(module, batch, grid, backbone, atol)


def _check_repeatable(
    module: torch.nn.Module, batch: torch.Tensor, out: torch.Tensor, backbone: Backbone, atol: float
) -> None:
    _check_batch_independence(module, batch, out, backbone, atol)
    again = _forward(module, batch, backbone)
    _require(_close(again, out, atol), backbone, f"two eval runs differ ({_max_diff(again, out)})")


def check_metadata(backbone: Backbone) -> None:
    """The parts of the contract that need no torch: what `capcli backbones` lists."""
    _require(isinstance(backbone, Backbone), backbone, f"is a {type(backbone).__name__}, not a Backbone")
    name = backbone.name
    _require(isinstance(name, str) and name.strip() == name and name != "", backbone, "needs a name")
    _require(not any(c in name for c in " /\\,"), backbone, f"name '{name}' has a space, slash or comma")
    dim = backbone.feature_dim
    _require(isinstance(dim, int) and dim > 0, backbone, f"feature_dim must be an int > 0, got {dim!r}")
    _require(callable(backbone.builder), backbone, "builder is not callable")
    _require(isinstance(backbone.weights_source, str), backbone, "weights_source must be a str")
    _require(isinstance(backbone.description, str), backbone, "description must be a str")
    _check_preprocessing(backbone)
    _check_grid_metadata(backbone)
    _check_split_metadata(backbone)


def _check_grid_metadata(backbone: Backbone) -> None:
    grid, builder = backbone.grid, backbone.grid_builder
    _require((grid is None) == (builder is None), backbone, "grid and grid_builder must be given together")
    if grid is None:
        return
    _require(isinstance(grid, Grid), backbone, f"grid is a {type(grid).__name__}, not a capcli.backbone.Grid")
    for name in ("channels", "height", "width"):
        value = getattr(grid, name)
        _require(isinstance(value, int) and value > 0, backbone, f"grid {name} must be an int > 0, got {value!r}")
    _require(callable(builder), backbone, "grid_builder is not callable")


def _check_preprocessing(backbone: Backbone) -> None:
    from capcli.images import RESAMPLE  # the interpolations the image pipeline can apply

    prep = backbone.preprocessing
    size, resize = prep.input_size, prep.resize
    _require(isinstance(size, int) and size > 0, backbone, f"input_size must be an int > 0, got {size!r}")
    _require(
        isinstance(resize, int) and resize >= size,
        backbone,
        f"resize (shorter side before the crop) must be an int >= input_size {size}, got {resize!r}",
    )
    for field in ("mean", "std"):
        values = getattr(prep, field)
        _require(
            len(values) == 3 and all(isinstance(v, int | float) and math.isfinite(v) for v in values),
            backbone,
            f"{field} must be 3 finite numbers (R, G, B), got {values!r}",
        )
    _require(all(s > 0 for s in prep.std), backbone, f"std must be > 0, got {prep.std!r}")
    _require(prep.resize_mode in RESIZE_MODES, backbone,
             f"resize_mode '{prep.resize_mode}' unknown; one of {list(RESIZE_MODES)}")
    _require(
        prep.interpolation in RESAMPLE,
        backbone,
        f"interpolation '{prep.interpolation}' unknown; one of {sorted(RESAMPLE)}",
    )


def _check_build(backbone: Backbone, build, weights: str) -> torch.nn.Module:
    from torch import nn

    what = f"{build.__name__}()"
    module = build(weights)
    _require(isinstance(module, nn.Module), backbone, f"{what} gave {type(module).__name__}, not nn.Module")
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    _require(not training, backbone, f"{what} must return eval mode; training: {training[:5]}")
    return module


def _random_batch(batch_size: int, size: int) -> torch.Tensor:
    """Seeded N(0,1) images: the scale of normalised pixels, without touching the global RNG."""
    import torch

    gen = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randn(batch_size, 3, size, size, generator=gen, dtype=torch.float32)


def _forward(module: torch.nn.Module, batch: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    import torch

    # inference_mode: feature extraction must not need autograd (it fails here if it does).
    with torch.inference_mode():
        try:
            out = module(batch)
        except Exception as exc:
            shape = tuple(batch.shape)
            raise AssertionError(
                f"backbone '{backbone.name}': forward on {shape} failed: {type(exc).__name__}: {exc}"
            ) from exc
    _require(isinstance(out, torch.Tensor), backbone, f"forward gave {type(out).__name__}, not a Tensor")
    return out


def _check_features(features: torch.Tensor, backbone: Backbone, batch_size: int) -> None:
    import torch

    shape, expected = tuple(features.shape), (batch_size, backbone.feature_dim)
    _require(shape == expected, backbone, f"features {shape}, expected {expected}")
    _require(features.dtype == torch.float32, backbone, f"features are {features.dtype}, expected float32")
    _require(bool(torch.isfinite(features).all()), backbone, "features contain NaN or inf")
    _require(not features.requires_grad, backbone, "features require grad")
    if batch_size >= 2:
        _require(not torch.equal(features[0], features[1]), backbone, "features do not depend on the input")


def _check_grid(grid: torch.Tensor, backbone: Backbone, batch_size: int, exact: bool) -> None:
    import torch

    declared = backbone.grid
    assert declared is not None
    shape = tuple(grid.shape)
    _require(len(shape) == 4, backbone, f"grid {shape}, expected 4 dims [B, C, H, W]")
    _require(shape[:2] == (batch_size, declared.channels), backbone,
             f"grid {shape}, expected [{batch_size}, {declared.channels}, H, W] (declared grid {declared})")
    if exact:
        expected = (batch_size, declared.channels, declared.height, declared.width)
        _require(shape == expected, backbone, f"grid {shape} at the input size, declared {expected}")
    _require(shape[2] >= 1 and shape[3] >= 1, backbone, f"grid {shape} has no positions")
    _require(grid.dtype == torch.float32, backbone, f"grid is {grid.dtype}, expected float32")
    _require(bool(torch.isfinite(grid).all()), backbone, "grid contains NaN or inf")
    if batch_size >= 2:
        _require(not torch.equal(grid[0], grid[1]), backbone, "grid does not depend on the input")


def _check_batch_independence(
    module: torch.nn.Module, batch: torch.Tensor, features: torch.Tensor, backbone: Backbone, atol: float
) -> None:
    for i in range(batch.shape[0]):
        alone = _forward(module, batch[i : i + 1], backbone)
        _require(
            _close(alone[0], features[i], atol),
            backbone,
            f"sample {i} alone differs from its row in the batch ({_max_diff(alone[0], features[i])}); "
            "does the module mix samples (e.g. BatchNorm in training mode)?",
        )


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    # Tolerance scales with the features' magnitude: batched and single convolutions may take
    # different kernels, whose rounding differs in proportion to the values.
    scale = max(1.0, float(b.abs().max()))
    return bool((a - b).abs().max() <= atol * scale)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max abs difference {float((a - b).abs().max()):.3g}, feature scale {float(b.abs().max()):.3g}"


def _require(condition: bool, backbone: object, message: str) -> None:
    if not condition:
        name = getattr(backbone, "name", repr(backbone))
        raise AssertionError(f"backbone '{name}': {message}")
