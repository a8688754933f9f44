"""Captioning with PyTorch eager: a run directory (or a bundle's source checkpoint) in, captions out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capcli.backbone import Preprocessing
from capcli.model import checkpoint, decoders
from capcli.model.attention import grid_positions
from capcli.model.finetune import grid_extractor
from capcli.model.steps import torch_step


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
        # The backbone's grid, or its trunk and the run's tuned tail; with the classes of its classifier, as export.
        self.classifier = None
        if self.kind == "attention":
            head = self.backbone_spec.classifier
            self.backbone = grid_extractor(self.backbone_spec, ckpt, weights, classes=head is not None).to(device)
            self.classifier = {"labels": head.labels, "classes": head.classes, "output": "classes"} if head else None
        else:
            self.backbone = self.backbone_spec.build(weights or ckpt["weights"]).to(device)
        self.grid = self.backbone_spec.grid if self.kind == "attention" else None
        self.vocab = Vocabulary.from_json(ckpt["vocab"])
        self.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
        self.max_len = int(ckpt["max_len"])
        self.device = device
        self.step = torch_step(self.decoder, device)
        self.checkpoint = ckpt

    def start(self, images: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Preprocessed images [B,3,S,S] float32 -> (initial state (h0, c0), per-image context)."""
        return self.start_with_classes(images)[:2]

    @torch.inference_mode()
    def start_with_classes(self, images: np.ndarray):
        """As `start`, and the class probabilities [B, classes] when the backbone has a classifier (else None)."""
        features = self.backbone(torch.from_numpy(images).to(self.device))
        probs = None
        if isinstance(features, tuple):
            features, probs = features[0], features[1].float().cpu().numpy()
        if self.kind == "attention":
            features = grid_positions(features)
        state, context = decoders.start(self.decoder, features)
        return state, context, probs

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """Preprocessed images [B,3,S,S] float32 -> initial state (h0, c0)."""
        return self.start(images)[0]


def _checkpoint_of(source: str | Path) -> Path:
    """A run dir, a checkpoint, or a bundle whose capcli.json names its source checkpoint.

    For a bundle, the checkpoint must be the very file it was exported from (source_checkpoint_sha256):
    a run trained further (or another run in the same place) would caption differently from the bundle.
    """
    from capcli.bundle import manifest
    from capcli.errors import CapcliError

    source = Path(source)
    if not (source / manifest.MANIFEST).is_file():
        return checkpoint.resolve(source)
    meta = manifest.read_manifest(source, verify=False)
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
        if manifest.sha256_file(cand) == expected:
            return cand
    raise CapcliError(f"bundle '{source}': {found[0]} is not the checkpoint the bundle was exported from "
                      "(sha256 differs: trained further since?); export again, or use --runtime onnx")
