"""A backbone's tail trained with the decoder: what `capcli train --finetune` adds to the attention decoder.

A backbone plugin may declare split points (`capcli.backbone.Split`): the frozen trunk's output is cached once
per image, and the tail (the last layers) runs on it in every training step, so only the tail's forward and
backward are paid per step, once per image however many of its captions the batch holds. BatchNorm keeps its
ImageNet statistics: a batch holds a few dozen images of one dataset, whose statistics would replace ones
estimated on a million. A checkpoint carries the tail's weights (`tail_entry`), and `grid_extractor` rebuilds
the whole grid extractor (trunk + tuned tail) from it for export and the PyTorch runtime.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from capcli.backbone import Backbone, Grid
from capcli.errors import CapcliError
from capcli.model.attention import grid_positions


class TunedTail(nn.Module):
    """Trunk rows [U, P', C'] (as cached, float16) -> grid rows [U, P, C] through the trainable tail."""

    def __init__(self, tail: nn.Module, trunk: Grid):
        super().__init__()
        self.tail = tail
        self.trunk = trunk

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        maps = rows.float().transpose(1, 2).reshape(rows.shape[0], t.channels, t.height, t.width)
        return grid_positions(self.tail(maps))

    def train(self, mode: bool = True) -> TunedTail:
        super().train(mode)
        for module in self.modules():  # running statistics stay ImageNet's (module docstring)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class FineTuned(nn.Module):
    """Tail + attention decoder as one trainable model: the decoder's forward, reading trunk rows."""

    def __init__(self, tail: TunedTail, decoder: nn.Module):
        super().__init__()
        self.tail = tail
        self.decoder = decoder

    @property
    def cfg(self):
        return self.decoder.cfg

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None):
        return self.decoder(self.tail(grid), tokens, rows)


def build_tail(backbone: Backbone, weights: str, split: str) -> TunedTail:
    """The split's tail with the backbone's weights, ready to train (its trunk is what the cache holds)."""
    _, tail = backbone.build_split(weights, split)
    return TunedTail(tail, backbone.split(split).trunk)


def tail_entry(tail: TunedTail, split: str) -> dict:
    """What a checkpoint records of a tuned tail."""
    return {"split": split, "trunk": tail.trunk.to_dict(), "state": tail.tail.state_dict()}


def load_tail(tail: nn.Module, entry: dict, backbone: str) -> None:
    """Put a checkpoint's tuned tail weights into a freshly built tail; one clear error when they do not fit."""
    try:
        tail.load_state_dict(entry["state"])
    except (RuntimeError, KeyError) as exc:
        raise CapcliError(f"the checkpoint's tuned tail does not fit backbone '{backbone}' split "
                          f"'{entry.get('split')}': {type(exc).__name__}") from None


def tuned_tail(backbone: Backbone, ckpt: dict) -> TunedTail:
    """The checkpoint's tuned tail, reading cached trunk rows."""
    entry = ckpt["tail"]
    tail = build_tail(backbone, ckpt["weights"], entry["split"])
    load_tail(tail.tail, entry, backbone.name)
    return tail


def grid_extractor(backbone: Backbone, ckpt: dict, weights: str | None = None, classes: bool = False) -> nn.Module:
    """Images [B,3,S,S] -> grid [B,C,H,W] as the checkpoint sees them: the backbone's grid module, or its trunk
    followed by the checkpoint's tuned tail. With `classes` (and a backbone that declares a classifier) it returns
    (grid, class probabilities [B, classes]); after fine-tuning the head reads the untouched tail's grid, which it
    was trained on, not the tuned one."""
    weights = weights or ckpt["weights"]
    entry = ckpt.get("tail")
    head = backbone.build_classifier(weights) if classes and backbone.classifier is not None else None
    if not entry:
        grid = backbone.build_grid(weights)
        return ClassifiedGrid(grid, head) if head is not None else grid
    trunk, tail = backbone.build_split(weights, entry["split"])
    frozen = copy.deepcopy(tail) if head is not None else None
    load_tail(tail, entry, backbone.name)
    if head is None:
        return nn.Sequential(trunk, tail).eval()
    return ClassifiedGrid(trunk, head, tail, frozen).eval()


class ClassifiedGrid(nn.Module):
    """Images -> (grid, class probabilities): `body` gives the grid (then `tail` does, from body's output) and the
    classifier `head` reads the grid, or with `frozen` the untouched tail's output."""

    def __init__(self, body: nn.Module, head: nn.Module, tail: nn.Module | None = None,
                 frozen: nn.Module | None = None):
        super().__init__()
        self.body, self.head, self.tail, self.frozen = body, head, tail, frozen

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.body(images)
        grid = self.tail(x) if self.tail is not None else x
        seen = self.frozen(x) if self.frozen is not None else grid
        return grid, torch.softmax(self.head(seen).float(), dim=-1)
