"""Batched greedy and sampled captions in torch, on the training device, with each token's log-probability.

Self-critical training needs captions from the model as it is being trained: several samples per image
whose log-probabilities carry gradients, and the greedy caption as the baseline. `capcli.decode` is the
numpy loop behind every runtime (no gradients, a copy per step); this is its torch twin for training and
follows the same rules, so a greedy rollout gives the captions `capcli.decode.greedy` gives: `<pad>` and
`<start>` are never generated, `<end>` not as the first word, at most `max_len` words.

Both decoder kinds are seen through three calls: `start` (per-image state, each image's rows repeated k
times), `step` (one token per row -> logits) and `select` (keep some rows). Rows that have produced
`<end>` leave the batch, so a step costs only the captions still running.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capcli.model.attention import AttentionDecoder
from capcli.model.pooled import lstm_step

State = tuple[torch.Tensor, ...]  # pooled: (h, c); attention: (h, c, context, projection)


@dataclass
class Rollout:
    tokens: torch.Tensor  # [N, T] generated ids; <end> (when reached) and <end> after it
    log_probs: torch.Tensor  # [N, T] log-probability of each generated token (<end> included), 0 after it
    mask: torch.Tensor  # [N, T] bool: the token was generated (up to and including <end>)

    def words(self, vocab) -> list[str]:
        """Each row as text (up to its <end>)."""
        return [vocab.decode(row) for row in self.tokens.tolist()]


def start(decoder, features: torch.Tensor, repeat: int = 1) -> State:
    """Per-image state for a batch of features (pooled [B, D] or grid [B, P, C]), each image's rows `repeat` times."""
    if isinstance(decoder, AttentionDecoder):
        context, projection, h, c = decoder.encode(features)
        return (h.repeat_interleave(repeat, 1), c.repeat_interleave(repeat, 1),
                context.repeat_interleave(repeat, 0), projection.repeat_interleave(repeat, 0))
    h, c = decoder.init_state(features)
    return h.repeat_interleave(repeat, 1), c.repeat_interleave(repeat, 1)


def step(decoder, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """One token per row -> (logits [N, V], the new state)."""
    embedded = decoder.embed(tokens)
    if isinstance(decoder, AttentionDecoder):
        h, c, context, projection = state
        top, h, c, _ = decoder.step(embedded, h, c, context, projection)
        return decoder.out(decoder.dropout(top)), (h, c, context, projection)
    h, c = lstm_step(decoder.lstm, embedded, *state)
    return decoder.out(decoder.dropout(h[-1])), (h, c)


def select(state: State, rows: torch.Tensor) -> State:
    """The state of the given rows: h and c hold the batch on axis 1, the attention context on axis 0."""
    return tuple(s.index_select(1 if i < 2 else 0, rows) for i, s in enumerate(state))


def rollout(
    decoder,
    features: torch.Tensor,
    start_id: int,
    end_id: int,
    never: tuple[int, ...],
    max_len: int,
    samples: int = 0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Greedy captions (samples=0: one row per image) or `samples` draws per image (rows image-major).

    Draws come from the model's distribution over the allowed tokens (temperature 1), and the log-probs
    returned are of that same renormalised distribution, so they are the policy's. Gradients flow
    unless called under torch.no_grad().
    """
    rows_per_image = max(samples, 1)
    state = start(decoder, features, rows_per_image)
    n = features.shape[0] * rows_per_image
    device = features.device
    rows = torch.arange(n, device=device)  # which output row each running row is
    tokens = torch.full((n,), start_id, dtype=torch.long, device=device)
    out = torch.full((n, max_len), end_id, dtype=torch.long, device=device)
    banned = torch.tensor(list(never), dtype=torch.long, device=device)
    banned_first = torch.tensor([*never, end_id], dtype=torch.long, device=device)
    log_probs, masks = [], []
    for t in range(max_len):
        logits, state = step(decoder, tokens, state)
        logits = logits.float().index_fill(1, banned_first if t == 0 else banned, float("-inf"))
        logp = F.log_softmax(logits, dim=-1)
        if samples:
            choice = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)
        else:
            choice = logp.detach().argmax(dim=1)
        out[rows, t] = choice
        chosen = logp.gather(1, choice.unsqueeze(1)).squeeze(1)
        log_probs.append(chosen.new_zeros(n).index_copy(0, rows, chosen))
        masks.append(torch.zeros(n, dtype=torch.bool, device=device).index_fill(0, rows, True))
        running = (choice != end_id).nonzero().squeeze(1)
        if running.numel() == 0:
            break
        rows, tokens, state = rows[running], choice[running], select(state, running)
    steps = len(log_probs)
    return Rollout(out[:, :steps], torch.stack(log_probs, 1), torch.stack(masks, 1))
