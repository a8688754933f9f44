"""The two decoder kinds side by side: which features each reads, its config, and how decoding starts.

"pooled" (CaptionDecoder) reads one vector per image; "attention" (AttentionDecoder) reads the
backbone's grid. A checkpoint records its kind (no record: pooled, as before kinds existed), and
every place that rebuilds a decoder goes through here, so a pooled and an attention checkpoint can
never be mistaken for one another.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
from torch import nn

from capcli.backbone import Backbone, first_problem
from capcli.errors import CapcliError
from capcli.model import DECODER_KINDS as KINDS
from capcli.model.attention import AttentionConfig, AttentionDecoder
from capcli.model.pooled import CaptionDecoder, DecoderConfig

_CONFIGS = {"pooled": DecoderConfig, "attention": AttentionConfig}
_MODULES = {"pooled": CaptionDecoder, "attention": AttentionDecoder}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise CapcliError(f"unknown decoder '{kind}'; use {' or '.join(KINDS)}")
    return kind


def feature_output(kind: str) -> str:
    """Which features the kind trains on: 'pooled' vectors or the 'grid'."""
    return "grid" if check_kind(kind) == "attention" else "pooled"


def feature_dim(backbone: Backbone, kind: str) -> int:
    """The size of what the decoder reads per image (per position, for a grid)."""
    if check_kind(kind) == "attention":
        return backbone.require_grid().channels
    return backbone.feature_dim


def kind_of(ckpt: dict) -> str:
    """The decoder kind a checkpoint was trained with."""
    kind = ckpt.get("decoder", "pooled")
    if kind not in KINDS:
        raise CapcliError(f"checkpoint has an unknown decoder kind '{kind}' (this capcli knows {', '.join(KINDS)})")
    return kind


def make_config(kind: str, config: dict) -> DecoderConfig | AttentionConfig:
    """The kind's config from a dict, with one clear error when the dict belongs to the other kind."""
    cls = _CONFIGS[check_kind(kind)]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        other = next((k for k in KINDS if k != kind and set(config) <= {f.name for f in fields(_CONFIGS[k])}), None)
        hint = f"; it looks like {_a(other)} decoder's" if other else ""
        raise CapcliError(f"decoder config has fields {_a(kind)} decoder does not know ({', '.join(unknown)}){hint}")
    return cls(**config)


def build(kind: str, config: DecoderConfig | AttentionConfig | dict) -> nn.Module:
    """A new decoder of `kind` (random weights) from its config."""
    cfg = make_config(kind, config) if isinstance(config, dict) else config
    if not isinstance(cfg, _CONFIGS[kind]):
        raise CapcliError(f"a {type(cfg).__name__} cannot configure {_a(kind)} decoder")
    return _MODULES[kind](cfg)


def load(ckpt: dict) -> nn.Module:
    """The checkpoint's decoder with its weights, in eval mode; a clear error when weights and kind disagree."""
    kind = kind_of(ckpt)
    decoder = build(kind, ckpt["config"])
    try:
        decoder.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CapcliError(f"checkpoint weights do not fit {_a(kind)} decoder: {first_problem(exc)}") from None
    return decoder.eval()


def kind_of_module(decoder: nn.Module) -> str:
    return "attention" if isinstance(decoder, AttentionDecoder) else "pooled"


@torch.inference_mode()
def start(decoder: nn.Module, features: torch.Tensor) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Features of a batch (pooled [B, D] or grid [B, P, C]) -> numpy (state, context) for `capcli.decode`."""
    if isinstance(decoder, AttentionDecoder):
        context, projection, h, c = decoder.encode(features)
        return (_np(h), _np(c)), (_np(context), _np(projection))
    h, c = decoder.init_state(features)
    return (_np(h), _np(c)), ()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind
