"""Every bundled backbone exports, and ONNX Runtime captions exactly like PyTorch (greedy and beam 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capcli import checkpoint
from capcli.caption import caption_images, open_captioner
from capcli.data.text import Vocabulary
from capcli.export import export
from capcli.model import CaptionDecoder, DecoderConfig
from capcli.registry import get_backbone

PHOTOS = sorted((Path(__file__).parent / "images").glob("*.jpg"))
WORDS = "a red green blue circle square star on the left right of large small background".split()


def random_checkpoint(path: Path, backbone_name: str, feature_input: bool = False) -> Path:
    """A decoder that was never trained: enough to compare runtimes, no training time spent."""
    spec = get_backbone(backbone_name)
    vocab = Vocabulary.build([" ".join(WORDS)], threshold=1)
    torch.manual_seed(0)
    cfg = DecoderConfig(feature_dim=spec.feature_dim, vocab_size=len(vocab), embed_dim=16, hidden_dim=32,
                        num_layers=2, dropout=0.0, feature_input=feature_input)
    decoder = CaptionDecoder(cfg)
    with torch.no_grad():  # larger output weights: clear winners at each step, not near-ties
        decoder.out.weight.mul_(20)
    checkpoint.save(path, {
        "config": cfg.to_dict(), "model": decoder.state_dict(), "vocab": vocab.to_json(),
        "vocab_sha256": vocab.sha256, "backbone": spec.name, "weights": "none", "feature_dim": spec.feature_dim,
        "preprocessing": spec.preprocessing.to_dict(), "max_len": 8, "dataset": "none",
        "dataset_fingerprint": None, "train_config": {"dataset": "none", "seed": 0}, "epoch": 0, "history": [],
    })
    return path


@pytest.mark.parametrize(
    ("backbone", "feature_input"),
    [("efficientnet_lite0", False), ("efficientnet_lite0", True), ("resnet152", False), ("inceptionv3", False),
     ("vgg16", False)],
)
def test_export_and_both_runtimes_agree(backbone, feature_input, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = random_checkpoint(run / "best.pt", backbone, feature_input)
    bundle = export(ckpt, tmp_path / "bundle", images=PHOTOS)
    onnx_cap = open_captioner(bundle, "onnx", provider="cpu")
    torch_cap = open_captioner(run, "torch")
    for beam in (1, 3):
        from_onnx = caption_images(onnx_cap, PHOTOS, beam_size=beam)
        from_torch = caption_images(torch_cap, PHOTOS, beam_size=beam)
        assert [r.caption for r in from_onnx] == [r.caption for r in from_torch], f"beam {beam}"
        scores = [(r.score, s.score) for r, s in zip(from_onnx, from_torch, strict=True)]
        assert all(abs(a - b) < 1e-3 for a, b in scores), scores
