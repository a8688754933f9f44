"""Every bundled backbone exports, with either decoder, and ONNX Runtime captions exactly like PyTorch
(greedy and beam 3) on real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capcli.bundle.build import export
from capcli.data.text import Vocabulary
from capcli.model import checkpoint
from capcli.model.attention import AttentionConfig, AttentionDecoder
from capcli.model.pooled import CaptionDecoder, DecoderConfig
from capcli.registry import get_backbone
from capcli.runtime.captioner import caption_images, open_captioner

PHOTOS = sorted((Path(__file__).parent / "images").glob("*.jpg"))
WORDS = "a red green blue circle square star on the left right of large small background".split()


def random_checkpoint(path: Path, backbone_name: str, feature_input: bool = False, kind: str = "pooled") -> Path:
    """A decoder that was never trained: enough to compare runtimes, no training time spent."""
    spec = get_backbone(backbone_name)
    vocab = Vocabulary.build([" ".join(WORDS)], threshold=1)
    torch.manual_seed(0)
    if kind == "attention":
        cfg = AttentionConfig(feature_dim=spec.grid.channels, vocab_size=len(vocab), embed_dim=16, hidden_dim=32,
                              num_layers=2, dropout=0.0, context_dim=24, attention_dim=20)
        decoder = AttentionDecoder(cfg)
        with torch.no_grad():  # sharper attention, so that it matters
            decoder.att_score.weight.mul_(10)
    else:
        cfg = DecoderConfig(feature_dim=spec.feature_dim, vocab_size=len(vocab), embed_dim=16, hidden_dim=32,
                            num_layers=2, dropout=0.0, feature_input=feature_input)
        decoder = CaptionDecoder(cfg)
    with torch.no_grad():  # larger output weights: clear winners at each step, not near-ties
        decoder.out.weight.mul_(20)
        decoder.out.bias[vocab.end_id] -= 40  # <end> unlikely: captions have words to compare
    checkpoint.save(path, {
        "config": cfg.to_dict(), "model": decoder.state_dict(), "vocab": vocab.to_json(), "decoder": kind,
        "vocab_sha256": vocab.sha256, "backbone": spec.name, "weights": "none", "feature_dim": cfg.feature_dim,
        "preprocessing": spec.preprocessing.to_dict(), "max_len": 8, "dataset": "none",
        "dataset_fingerprint": None, "train_config": {"dataset": "none", "seed": 0}, "epoch": 0, "history": [],
    })
    return path


@pytest.mark.parametrize(
    ("backbone", "feature_input", "kind"),
    [("efficientnet_lite0", False, "pooled"), ("efficientnet_lite0", True, "pooled"), ("resnet152", False, "pooled"),
     ("inceptionv3", False, "pooled"), ("vgg16", False, "pooled"),
     ("efficientnet_lite0", False, "attention"), ("resnet152", False, "attention"),
     ("inceptionv3", False, "attention"), ("vgg16", False, "attention")],
)
def test_export_and_both_runtimes_agree(backbone, feature_input, kind, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = random_checkpoint(run / "best.pt", backbone, feature_input, kind)
    bundle = export(ckpt, tmp_path / "bundle", images=PHOTOS)
    onnx_cap = open_captioner(bundle, "onnx", provider="cpu")
    torch_cap = open_captioner(run, "torch")
    attention = kind == "attention"
    for beam in (1, 3):
        from_onnx = caption_images(onnx_cap, PHOTOS, beam_size=beam, attention=attention)
        from_torch = caption_images(torch_cap, PHOTOS, beam_size=beam, attention=attention)
        assert [r.caption for r in from_onnx] == [r.caption for r in from_torch], f"beam {beam}"
        assert all(r.caption for r in from_onnx)
        scores = [(r.score, s.score) for r, s in zip(from_onnx, from_torch, strict=True)]
        assert all(abs(a - b) < 1e-3 for a, b in scores), scores
        if attention:  # the same attention maps, word for word, over the backbone's own grid
            grid = get_backbone(backbone).grid
            for r, s in zip(from_onnx, from_torch, strict=True):
                assert r.grid == s.grid == (grid.height, grid.width)
                assert [w for w, _ in r.attention] == r.caption.split() == [w for w, _ in s.attention]
                for (_, a), (_, b) in zip(r.attention, s.attention, strict=True):
                    assert a.shape == (grid.positions,) and abs(float(a.sum()) - 1) < 1e-4
                    assert float(abs(a - b).max()) < 1e-3
