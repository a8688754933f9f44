"""A decoder as the numpy step function that `capcli.decode` searches with (greedy, beam, sampling).

Validation during training, export's parity check and the PyTorch runtime all decode through these.
"""

from __future__ import annotations

import numpy as np
import torch

from capcli.model.attention import AttentionDecoder, AttentionStep
from capcli.model.pooled import CaptionDecoder, DecoderStep


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
