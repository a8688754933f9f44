"""A training run's options (`TrainConfig`), their one validator, and the settings a resumed run takes from its
checkpoint.

Used by the library (`TrainConfig.validate`, called by `train`) and so by the CLI: every bad option
is named in one line, before any data is read or any file written. Torch is not imported here.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from capcli.backbone import RESIZE_MODES
from capcli.errors import CapcliError
from capcli.model import DECODER_KINDS

# Dimensions and depth beyond these cannot fit a caption decoder in memory anywhere sensible; refusing
# them is kinder than an allocation traceback or the kernel's OOM killer.
MAX_DIM = 8192
MAX_LAYERS = 16
MAX_BATCH = 8192  # captions per step: the step's logits are batch x words x vocabulary floats
MAX_FEATURE_BATCH = 1024  # images through the backbone at once
MAX_CAPTION_WORDS = 1000  # --max-len: what a bundle's manifest accepts (capcli.bundle.schema.MAX_LEN)
MAX_SEED = 2**31 - 1  # the seed also seeds numpy (>= 0) and per-epoch shuffles (seed * 1000 + epoch)
# Options that may differ when a run is resumed: how long and where it runs, not what it learns.
CHANGEABLE_ON_RESUME = frozenset({"epochs", "patience", "device", "workers", "engine", "feature_batch_size",
                                  "out", "resume", "given", "extra", "precision"})
# Of those, what a resumed run takes from its own settings unless given anew: it finishes the job as started.
KEPT_UNLESS_GIVEN = ("epochs", "patience")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(low: int, high: int | None = None):
    def check(value: Any) -> str | None:
        if not _is_int(value) or value < low or (high is not None and value > high):
            return f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"
        return None

    return check


def _number_in(low: float, high: float, low_open: bool, high_open: bool):
    def check(value: Any) -> str | None:
        ok = _is_number(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            return f"a finite number in {left}{low:g}, {high:g}{right}"
        return None

    return check


def _positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "a finite number above 0"


def _optional(check):
    return lambda value: None if value is None else check(value)


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "given"


def _one_of(choices: tuple[str, ...]):
    return lambda value: None if value in choices else " or ".join(choices)


# One rule per option: what a valid value is, said in the words of the error message.
RULES = {
    "backbone": _text,
    "dataset": _text,
    "weights": _text,
    "epochs": _int_at_least(1),
    "batch_size": _int_at_least(1, MAX_BATCH),
    "lr": _positive_number,
    "lr_keep_epochs": _int_at_least(0),
    "lr_decay": _number_in(0, 1, low_open=True, high_open=False),
    "clip_norm": _positive_number,
    "patience": _int_at_least(1),
    "threshold": _int_at_least(1),
    "max_len": _int_at_least(1, MAX_CAPTION_WORDS),
    "embed_dim": _int_at_least(1, MAX_DIM),
    "hidden_dim": _int_at_least(1, MAX_DIM),
    "num_layers": _int_at_least(1, MAX_LAYERS),
    "dropout": _number_in(0, 1, low_open=False, high_open=True),
    "val_sample": _int_at_least(1),
    "seed": _int_at_least(0, MAX_SEED),
    "workers": _optional(_int_at_least(0)),
    "feature_batch_size": _int_at_least(1, MAX_FEATURE_BATCH),
    "decoder": _optional(_one_of(DECODER_KINDS)),
    "context_dim": _int_at_least(1, MAX_DIM),
    "attention_dim": _int_at_least(1, MAX_DIM),
    "attention_reg": _number_in(0, 1000, low_open=False, high_open=False),
    "select_on": _one_of(("cider", "loss")),
    "label_smoothing": _number_in(0, 1, low_open=False, high_open=True),
    "precision": _one_of(("auto", "bf16", "fp32")),
    "resize_mode": _one_of(("auto", *RESIZE_MODES)),
    "split": _optional(_text),
    "backbone_lr": _positive_number,
}


def problems(cfg) -> list[str]:
    """One line per bad option of a TrainConfig."""
    found = []
    for name, check in RULES.items():
        value = getattr(cfg, name, None)
        expected = check(value)
        if expected is not None:
            found.append(f"{flag(name)} must be {expected} (got {value!r})")
    return found


def validate(cfg) -> None:
    """CapcliError naming every bad option, in one line."""
    found = problems(cfg)
    if found:
        raise CapcliError("invalid training options: " + "; ".join(found))


def explicitly_given(cfg) -> set[str]:
    """The options the user set: `cfg.given` when the CLI filled it, else those not at their default."""
    if cfg.given is not None:
        return set(cfg.given)
    given = set()
    for f in fields(cfg):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is MISSING or getattr(cfg, f.name) != default:
            given.add(f.name)
    return given


def settings_for_resume(cfg, saved: dict[str, Any]):
    """`cfg` with the resumed run's own settings; CapcliError if an explicitly given one conflicts."""
    fixed = [f.name for f in fields(cfg) if f.name not in CHANGEABLE_ON_RESUME and f.name in saved]
    conflicts = [
        f"{flag(name)} {getattr(cfg, name)!r} (the run has {saved[name]!r})"
        for name in fixed
        if name in explicitly_given(cfg) and getattr(cfg, name) != saved[name]
    ]
    if conflicts:
        raise CapcliError(
            "--resume continues a run with its own settings, and these options differ: "
            + "; ".join(conflicts)
            + ". Drop them, or start a new run with another --out"
        )
    kept = {name: saved[name] for name in KEPT_UNLESS_GIVEN if name in saved and name not in explicitly_given(cfg)}
    return replace(cfg, **{name: saved[name] for name in fixed}, **kept)


@dataclass
class TrainConfig:
    backbone: str
    dataset: str = "synthetic"
    images: str | None = None
    weights: str = "imagenet"
    out: str | None = None
    epochs: int = 20
    # The defaults are the Flickr8k recipe (README, "Real photographs"; benchmarks/bench_flickr8k.py), chosen on val.
    batch_size: int = 128
    lr: float = 2e-3
    lr_keep_epochs: int = 3  # constant LR for this many epochs, then x lr_decay per epoch
    lr_decay: float = 0.9
    clip_norm: float = 1.0
    patience: int = 4
    threshold: int = 5
    max_len: int = 20
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    feature_input: bool = False  # image also as the LSTM's first input step (pooled decoder)
    decoder: str | None = None  # "pooled" or "attention" (needs a grid); None: DEFAULT_DECODER, or the resumed run's
    context_dim: int = 256  # attention: grid channels after the learned per-image projection
    attention_dim: int = 256  # attention: hidden size of the additive attention
    attention_reg: float = 1.0  # attention: lambda of the doubly stochastic regularisation
    val_sample: int = 1000  # images captioned (greedy) per epoch for BLEU-4 / CIDEr-D (model selection)
    select_on: str = "cider"  # best.pt and early stopping: "cider" (val CIDEr-D of greedy captions) or "loss"
    label_smoothing: float = 0.1
    precision: str = "auto"  # matrix products in "bf16" or "fp32"; auto: bf16 where the device computes it natively
    # How photos are framed (capcli.backbone.RESIZE_MODES); auto: squash when the training images are square
    # (capcli.images.auto_resize_mode). A run records the mode it resolved, so a resumed run keeps it.
    resize_mode: str = "auto"
    finetune: bool = False  # train the backbone's tail (after its split point) with the attention decoder
    split: str | None = None  # the split point to fine-tune from (None: the backbone's default)
    backbone_lr: float = 1e-4  # the tail's Adam learning rate (the decoder's is lr)
    flip: bool = False  # augmentation: each epoch shows about half the training images mirrored left to right
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    engine: str = "auto"  # feature extraction: auto (ONNX Runtime on CPU, PyTorch on CUDA), torch, onnx
    feature_batch_size: int = 32
    resume: bool = False
    extra: dict = field(default_factory=dict)
    # Names of the options the user set explicitly (the CLI fills it); None: those not at their default.
    # `--resume` refuses an explicitly given option that conflicts with the run's own.
    given: tuple[str, ...] | None = None

    def validate(self) -> None:
        """CapcliError naming every bad option in one line (the one validator of training options)."""
        validate(self)
