import numpy as np
import pytest
import torch

from capcli.model.pooled import CaptionDecoder, DecoderConfig, DecoderStep
from capcli.model.steps import TorchStep


@pytest.mark.parametrize(("layers", "feature_input"), [(1, False), (2, False), (2, True)])
def test_step_shares_weights_with_teacher_forced_forward(layers, feature_input):
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(feature_dim=16, vocab_size=30, embed_dim=8, hidden_dim=12,
                                           num_layers=layers, feature_input=feature_input)).eval()
    features, tokens = torch.randn(3, 16), torch.randint(0, 30, (3, 6))
    with torch.no_grad():
        full = torch.log_softmax(decoder(features, tokens), -1)
        step = DecoderStep(decoder)
        h, c = decoder.init_state(features)
        stepped = []
        for t in range(tokens.shape[1]):
            lp, h, c = step(tokens[:, t], h, c)
            stepped.append(lp)
    assert torch.allclose(torch.stack(stepped, 1), full, atol=1e-5)


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(feature_dim=4, vocab_size=10, embed_dim=4, hidden_dim=5)).eval()
    f = torch.randn(1, 4)
    short = torch.tensor([[1, 5, 6]])
    padded = torch.tensor([[1, 5, 6, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(decoder(f, short), decoder(f, padded)[:, :3], atol=1e-6)


def test_torch_step_speaks_numpy():
    decoder = CaptionDecoder(DecoderConfig(feature_dim=4, vocab_size=10, embed_dim=4, hidden_dim=5)).eval()
    h, c = (x.detach().numpy() for x in decoder.init_state(torch.randn(2, 4)))
    log_probs, (h2, c2) = TorchStep(decoder)(np.array([1, 1]), (h, c))
    assert log_probs.shape == (2, 10) and h2.shape == h.shape
    assert np.allclose(np.exp(log_probs).sum(1), 1.0, atol=1e-5)


def test_feature_input_is_one_lstm_step_on_the_image():
    torch.manual_seed(0)
    cfg = DecoderConfig(feature_dim=6, vocab_size=10, embed_dim=4, hidden_dim=5, feature_input=True)
    decoder = CaptionDecoder(cfg).eval()
    f = torch.randn(2, 6)
    with torch.no_grad():
        h, c = decoder.init_state(f)
        plain = CaptionDecoder(DecoderConfig(**{**cfg.to_dict(), "feature_input": False})).eval()
        plain.load_state_dict({k: v for k, v in decoder.state_dict().items() if not k.startswith("feature_embed")})
        h0, c0 = plain.init_state(f)
        x = decoder.feature_embed(decoder.feature_norm(f))
        _, (h1, c1) = decoder.lstm(x[:, None], (h0, c0))
    assert torch.allclose(h, h1, atol=1e-6) and torch.allclose(c, c1, atol=1e-6)
