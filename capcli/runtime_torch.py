"""Captioning with PyTorch eager: a run directory (or a bundle's source checkpoint) in, captions out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capcli import checkpoint, decoders
from capcli.attention import AttentionDecoder, AttentionStep, grid_positions
from capcli.backbone import Preprocessing
from capcli.model import CaptionDecoder, DecoderStep


class TorchStep:
    """The decode Step interface over DecoderStep: numpy in, numpy out."""

    def __init__(self, decoder: CaptionDecoder, device: str = "cpu"):
        self.step = DecoderStep(decoder).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, tokens: np.ndarray, state: tuple[np.ndarray, ...]):
        h, c = (torch.from_numpy(np.ascontiguousarray(s)).to(self.device) for s in state)
        log_probs, h, c = self.step(torch.from_numpy(tokens).to(self.device), h, c)
        return log_probs.float().cpu().numpy(), (h.float().cpu().numpy(), c.float().cpu().numpy())


class TorchAttentionStep:
    """The decode ContextStep interface over AttentionStep: context = (grid, projection), numpy in and out."""

    def __init__(self, decoder: AttentionDecoder, device: str = "cpu"):
        self.step = AttentionStep(decoder).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, tokens: np.ndarray, state: tuple[np.ndarray, ...], context: tuple[np.ndarray, ...]):
        h, c, grid, projection = (torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in (*state, *context))
        log_probs, h, c, alpha = self.step(torch.from_numpy(tokens).to(self.device), h, c, grid, projection)
        numpy = [t.float().cpu().numpy() for t in (log_probs, h, c, alpha)]
        return numpy[0], (numpy[1], numpy[2]), numpy[3]


def torch_step(decoder, device: str = "cpu"):
    """The numpy step for either decoder kind."""
    if isinstance(decoder, AttentionDecoder):
        return TorchAttentionStep(decoder, device)
    return TorchStep(decoder, device)


class TorchCaptioner:
    """Encoder (backbone + state init) and step in PyTorch, sharing the Captioner interface with ONNX."""

    runtime = "torch"
    state_batch_axes = (1, 1)  # h and c are [layers, batch, hidden]

    def __init__(self, source: str | Path, device: str = "cpu", weights: str | None = None):
        from capcli.data.text import Vocabulary
        from capcli.registry import get_backbone

        ckpt = checkpoint.load(_checkpoint_of(source))
        self.backbone_spec = get_backbone(ckpt["backbone"])
        self.kind = decoders.kind_of(ckpt)
        checkpoint.check_matches(ckpt, self.backbone_spec.name, decoders.feature_dim(self.backbone_spec, self.kind))
        self.decoder = checkpoint.build_decoder(ckpt).to(device)
        build = self.backbone_spec.build_grid if self.kind == "attention" else self.backbone_spec.build
        self.backbone = build(weights or ckpt["weights"]).to(device)
        self.grid = self.backbone_spec.grid if self.kind == "attention" else None
        self.vocab = Vocabulary.from_json(ckpt["vocab"])
        self.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
        self.max_len = int(ckpt["max_len"])
        self.device = device
        self.step = torch_step(self.decoder, device)
        self.checkpoint = ckpt

    @torch.inference_mode()
    def start(self, images: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Preprocessed images [B,3,S,S] float32 -> (initial state (h0, c0), per-image context)."""
        features = self.backbone(torch.from_numpy(images).to(self.device))
        if self.kind == "attention":
            features = grid_positions(features)
        return decoders.start(self.decoder, features)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """Preprocessed images [B,3,S,S] float32 -> initial state (h0, c0)."""
        return self.start(images)[0]


def _checkpoint_of(source: str | Path) -> Path:
    """A run dir, a checkpoint, or a bundle whose capcli.json names its source checkpoint.

    For a bundle, the checkpoint must be the very file it was exported from (source_checkpoint_sha256):
    a run trained further (or another run in the same place) would caption differently from the bundle.
    """
    from capcli import bundle
    from capcli.errors import CapcliError

    source = Path(source)
    if not (source / bundle.MANIFEST).is_file():
        return checkpoint.resolve(source)
    meta = bundle.read_manifest(source, verify=False)
    expected = meta.get("source_checkpoint_sha256")
    if expected is None:
        raise CapcliError(f"bundle '{source}': capcli.json has no 'source_checkpoint_sha256', so its source "
                          "checkpoint cannot be verified; use --runtime onnx or give the run dir")
    src = meta.get("source_checkpoint")
    candidates = [Path(src)] if src else []
    candidates.append(source / "checkpoint.pt")
    found = [cand for cand in candidates if cand.is_file()]
    if not found:
        raise CapcliError(f"bundle '{source}' has no source checkpoint here; use --runtime onnx or give the run dir")
    for cand in found:
        if bundle.sha256_file(cand) == expected:
            return cand
    raise CapcliError(f"bundle '{source}': {found[0]} is not the checkpoint the bundle was exported from "
                      "(sha256 differs: trained further since?); export again, or use --runtime onnx")
