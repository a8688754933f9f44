"""The backbone plugin contract: what a plugin object exposes, and helpers plugins share.

A plugin registers one `Backbone` per entry point in the group `capcli.backbones`. Creating a
`Backbone` must not import torch: `capcli backbones` lists plugins without it. Only `build` and
`build_grid` may.

A backbone may also declare a spatial feature `Grid` (channels x height x width, taken before
pooling, at its own input size) with a `grid_builder`: the attention decoder attends over it. A
backbone without one still serves the pooled decoder. Two more optional parts build on the grid:
`splits`, points that cut the grid extractor into a frozen trunk and a trainable tail (`capcli train
--finetune` caches the trunk's output once and trains the tail with the decoder), and `classifier`, the
backbone's own ImageNet head on the grid (its classes guide captions of photos far from the training data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capcli.errors import CapcliError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_CHOICES = "'imagenet', 'none' or a path to a state dict"
# How a photo becomes the square the backbone sees. crop: the shorter side to `resize`, then the centre crop
# (ImageNet's evaluation framing); squash: both sides to `resize` (the aspect ratio is not kept), then the
# centre crop, which frames any photo as a square copy made by squashing it was framed.
RESIZE_MODES = ("crop", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the backbone's input: resize (`resize_mode`), centre-crop, normalise."""

    input_size: int
    resize: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # "bilinear" | "bicubic"
    resize_mode: str = "crop"  # one of RESIZE_MODES

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "resize_mode": self.resize_mode,
            "crop": "center",
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize=int(d["resize"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
            resize_mode=str(d.get("resize_mode", "crop")),  # recorded since resize modes exist; crop before
        )

    def with_resize_mode(self, mode: str) -> Preprocessing:
        """The same preprocessing with another resize mode; one clear error for an unknown one."""
        if mode not in RESIZE_MODES:
            raise CapcliError(f"unknown resize mode '{mode}'; one of {', '.join(RESIZE_MODES)}")
        return replace(self, resize_mode=mode)


@dataclass(frozen=True)
class Grid:
    """A backbone's spatial features before pooling, at its input size: `channels` x `height` x `width`."""

    channels: int
    height: int
    width: int

    @property
    def positions(self) -> int:
        """P = height * width: the places the attention decoder can look at."""
        return self.height * self.width

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"

    def to_dict(self) -> dict[str, int]:
        return {"channels": self.channels, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(channels=int(d["channels"]), height=int(d["height"]), width=int(d["width"]))


@dataclass(frozen=True)
class Split:
    """A cut inside the grid extractor: a frozen trunk (images [B,3,S,S] -> `trunk` [B,C,H,W] at the input size)
    and a trainable tail (the trunk's output -> the backbone's grid), so that tail(trunk(x)) == grid(x).

    `builder(weights)` returns (trunk, tail) in eval mode, built from one model. The name says where the cut is
    (a module path of the plugin's model, e.g. 'blocks.6'); the first split a backbone lists is its default.
    """

    name: str
    trunk: Grid
    builder: Callable[[str], tuple[torch.nn.Module, torch.nn.Module]] = field(repr=False)
    description: str = ""


@dataclass(frozen=True)
class Classifier:
    """The backbone's own classification head on its grid: [B, C, H, W] -> logits [B, classes].

    `labels` names the label set, whose class ids, names and caption words capcli ships ('imagenet-1k': the
    1,000 ImageNet classes in the usual order, see `capcli.guidance`).
    """

    labels: str
    classes: int
    builder: Callable[[str], torch.nn.Module] = field(repr=False)


@dataclass(frozen=True)
class Backbone:
    """A CNN that maps a normalised image batch [B,3,S,S] to pooled features [B,D].

    With `grid` and `grid_builder` it also maps the batch to its feature grid [B,C,H,W] (before
    pooling), which the attention decoder needs.
    """

    name: str
    feature_dim: int
    preprocessing: Preprocessing
    builder: Callable[[str], torch.nn.Module] = field(repr=False)
    weights_source: str = "imagenet"
    description: str = ""
    grid: Grid | None = None
    grid_builder: Callable[[str], torch.nn.Module] | None = field(default=None, repr=False)
    splits: tuple[Split, ...] = ()
    classifier: Classifier | None = None

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocessing.std

    @property
    def has_grid(self) -> bool:
        return self.grid is not None and self.grid_builder is not None

    def require_grid(self) -> Grid:
        """The declared grid, or one clear error naming the plugin that has none."""
        if not self.has_grid:
            raise CapcliError(
                f"backbone '{self.name}' declares no feature grid, which the attention decoder needs; "
                "use --decoder pooled with it, or a backbone that lists a grid in `capcli backbones`"
            )
        assert self.grid is not None
        return self.grid

    def with_resize_mode(self, mode: str) -> Backbone:
        """This backbone seeing photos with another resize mode (`RESIZE_MODES`)."""
        return replace(self, preprocessing=self.preprocessing.with_resize_mode(mode))

    def split(self, name: str | None = None) -> Split:
        """The named split point (None: the default, the first listed), or one clear error naming the choices."""
        self.require_grid()
        if not self.splits:
            raise CapcliError(f"backbone '{self.name}' declares no split point, so its layers cannot be "
                              "fine-tuned; train without --finetune")
        if name is None:
            return self.splits[0]
        for split in self.splits:
            if split.name == name:
                return split
        raise CapcliError(f"backbone '{self.name}' has no split '{name}'; available: "
                          + ", ".join(s.name for s in self.splits))

    def build_split(self, weights: str = "imagenet", name: str | None = None) -> tuple[torch.nn.Module, ...]:
        """(trunk, tail) of the named split, both in eval mode, from one model holding `weights`."""
        split = self.split(name)
        trunk, tail = _seeded_build(split.builder, weights, module=False)
        return trunk.eval(), tail.eval()

    def build_classifier(self, weights: str = "imagenet") -> torch.nn.Module:
        """The classification head in eval mode: grid [B,C,H,W] -> logits [B, classes]."""
        if self.classifier is None:
            raise CapcliError(f"backbone '{self.name}' declares no classifier")
        return _seeded_build(self.classifier.builder, weights)

    def build(self, weights: str = "imagenet") -> torch.nn.Module:
        """The feature extractor in eval mode; weights: 'imagenet', 'none' (seeded random) or a path."""
        return _seeded_build(self.builder, weights)

    def build_grid(self, weights: str = "imagenet") -> torch.nn.Module:
        """The grid extractor in eval mode: [B,3,S,S] -> [B, C, H, W]; weights as for `build`."""
        self.require_grid()
        assert self.grid_builder is not None
        return _seeded_build(self.grid_builder, weights)


def _seeded_build(builder: Callable[[str], Any], weights: str, module: bool = True) -> Any:
    import torch

    check_weights_arg(weights)
    if weights == "none":
        # Random init is seeded so that 'none' features are reproducible (tests, cache keys), and the
        # pooled and grid modules of one backbone get the same random weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = builder(weights)
    else:
        built = builder(weights)
    return built.eval() if module else built


def check_weights_arg(weights: str) -> None:
    if weights in ("imagenet", "none"):
        return
    path = Path(weights)
    if not path.is_file():
        raise CapcliError(f"weights must be {WEIGHT_CHOICES}; no file at '{weights}'")


def weights_id(weights: str) -> str:
    """A stable id for a weights choice, used in cache keys: a file is named by its content hash."""
    check_weights_arg(weights)
    if weights in ("imagenet", "none"):
        return weights
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "file-" + digest.hexdigest()[:16]


def load_state_dict_file(module: torch.nn.Module, path: str, backbone: str) -> None:
    """Load a local state dict into `module`, with one clear line when it does not fit."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise CapcliError(f"cannot read weights file '{path}': {type(exc).__name__}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise CapcliError(f"weights file '{path}' does not fit {backbone}: {first_problem(exc)}") from exc


def first_problem(exc: BaseException, limit: int = 300) -> str:
    """torch's load_state_dict message is a header line, then one line per problem: the first one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    details = [line for line in lines if not line.startswith("Error(s) in loading state_dict")]
    first = (details or lines or [type(exc).__name__])[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def load_weights(module: torch.nn.Module, weights: str, backbone: str, imagenet_state: dict | None = None) -> None:
    """Put the chosen weights into a freshly built full model (head included, so standard files fit).

    'imagenet' loads `imagenet_state` (fetched by the plugin before building, so offline fails
    fast), 'none' keeps the random init, anything else is a local state-dict file.
    """
    if weights == "imagenet":
        module.load_state_dict(imagenet_state)
    elif weights != "none":
        load_state_dict_file(module, weights, backbone)


def pretrained_model(backbone: str, weights: str, build: Callable[[], torch.nn.Module], imagenet_url: str):
    """A freshly built full model (`build()`, random init) holding the chosen weights: 'imagenet' from
    `imagenet_url` through torch.hub's cache (fetched first, so offline fails before any work), 'none', or a
    local state-dict file. The plugins' one way to make a torchvision classifier a backbone."""
    state = download_state_dict(backbone, imagenet_url) if weights == "imagenet" else None
    model = build()
    load_weights(model, weights, backbone, state)
    return model


def download_state_dict(backbone: str, url: str) -> dict[str, Any]:
    """Pretrained weights through torch.hub's download cache ($TORCH_HOME); one clear line when offline."""
    import torch

    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except Exception as exc:  # offline, proxy, truncated download, bad hash: all one line
        raise download_failed(backbone, exc) from exc


def download_failed(backbone: str, exc: BaseException) -> CapcliError:
    """The one line shown when pretrained weights cannot be fetched (usually: no network)."""
    reason = type(exc).__name__
    return CapcliError(
        f"could not download ImageNet weights for {backbone} ({reason}: network unreachable?); "
        "use --weights none or --weights PATH to a local state dict"
    )
