"""Captioning with PyTorch eager: a run directory (or a bundle's source checkpoint) in, captions out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capcli import checkpoint
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


class TorchCaptioner:
    """Encoder (backbone + state init) and step in PyTorch, sharing the Captioner interface with ONNX."""

    runtime = "torch"
    state_batch_axes = (1, 1)  # h and c are [layers, batch, hidden]

    def __init__(self, source: str | Path, device: str = "cpu", weights: str | None = None):
        from capcli.data.text import Vocabulary
        from capcli.registry import get_backbone

        ckpt = checkpoint.load(_checkpoint_of(source))
        self.backbone_spec = get_backbone(ckpt["backbone"])
        checkpoint.check_matches(ckpt, self.backbone_spec.name, self.backbone_spec.feature_dim)
        self.decoder = checkpoint.build_decoder(ckpt).to(device)
        self.backbone = self.backbone_spec.build(weights or ckpt["weights"]).to(device)
        self.vocab = Vocabulary.from_json(ckpt["vocab"])
        self.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
        self.max_len = int(ckpt["max_len"])
        self.device = device
        self.step = TorchStep(self.decoder, device)
        self.checkpoint = ckpt

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images [B,3,S,S] float32 -> initial state (h0, c0)."""
        features = self.backbone(torch.from_numpy(images).to(self.device))
        h, c = self.decoder.init_state(features)
        return h.float().cpu().numpy(), c.float().cpu().numpy()


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
