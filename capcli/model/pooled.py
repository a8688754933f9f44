"""The caption decoder: image feature -> initial LSTM state, then words one after another.

`CaptionDecoder.forward` runs whole captions with teacher forcing in one call (training);
`DecoderStep` runs one step with the very same parameters and no time axis (decoding, export).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LstmConfig:
    """What both decoders share: the vocabulary, the word embedding and the LSTM."""

    feature_dim: int
    vocab_size: int
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.3
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def lstm(self, input_size: int) -> nn.LSTM:
        """The decoder's LSTM over `input_size` inputs per step (dropout between layers only when stacked)."""
        return nn.LSTM(input_size, self.hidden_dim, self.num_layers, batch_first=True,
                       dropout=self.dropout if self.num_layers > 1 else 0.0)


@dataclass(frozen=True)
class DecoderConfig(LstmConfig):
    feature_input: bool = False  # also feed the image as the LSTM's first input step (Show and Tell)


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        # Backbone features differ wildly in scale (vgg fc7 vs avg pools); normalising them keeps
        # one learning rate good for every backbone.
        self.feature_norm = nn.LayerNorm(cfg.feature_dim)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.num_layers * cfg.hidden_dim)
        self.init_c = nn.Linear(cfg.feature_dim, cfg.num_layers * cfg.hidden_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)
        self.feature_embed = nn.Linear(cfg.feature_dim, cfg.embed_dim) if cfg.feature_input else None
        self.lstm = cfg.lstm(cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, D] -> (h0, c0), each [layers, B, hidden].

        With `feature_input` the image is also the first input step, so the state returned is the
        one after that step: decoding (and the exported encoder) starts from it unchanged.
        """
        f = self.dropout(self.feature_norm(features.float()))
        shape = (features.shape[0], self.cfg.num_layers, self.cfg.hidden_dim)
        h = torch.tanh(self.init_h(f)).view(shape).transpose(0, 1).contiguous()
        c = self.init_c(f).view(shape).transpose(0, 1).contiguous()
        if self.feature_embed is not None:
            h, c = lstm_step(self.lstm, self.feature_embed(f), h, c)
        return h, c

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: features [B, D], input tokens [B, T] -> logits [B, T, V].

        Padding sits at the end of each row and the LSTM is causal, so outputs at real positions
        never see padding; the loss ignores the padded positions. No packing needed.
        """
        state = self.init_state(features)
        hidden, _ = self.lstm(self.dropout(self.embed(tokens)), state)
        return self.out(self.dropout(hidden))


class DecoderStep(nn.Module):
    """One decoding step over the decoder's own parameters: (token [B], h, c) -> (log_probs, h', c').

    The LSTM cell equations are written out (as nn.LSTMCell computes them) so the exported graph
    is plain matrix products with a dynamic batch and no time axis.
    """

    def __init__(self, decoder: CaptionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(
        self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, c = lstm_step(self.decoder.lstm, self.decoder.embed(tokens), h, c)
        return torch.log_softmax(self.decoder.out(h[-1]), dim=-1), h, c


def lstm_step(lstm: nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step of a (multi-layer) nn.LSTM with its own weights: x [B, in], h/c [layers, B, hidden]."""
    hs, cs = [], []
    for layer in range(lstm.num_layers):
        w_ih = getattr(lstm, f"weight_ih_l{layer}")
        w_hh = getattr(lstm, f"weight_hh_l{layer}")
        b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        gates = x @ w_ih.t() + h[layer] @ w_hh.t() + b
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        x = h_new
    return torch.stack(hs), torch.stack(cs)


class Encoder(nn.Module):
    """Backbone + the decoder's state initialisation: image batch -> (h0, c0). The exported encoder."""

    def __init__(self, backbone: nn.Module, decoder: CaptionDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.init_state(self.backbone(images))
