"""The attention decoder (Show, Attend and Tell, soft attention): words from a grid of image features.

Per image, once (`AttentionDecoder.encode`, the exported encoder's head): the grid [B, P, C] is
normalised and projected to C' channels (a learned projection keeps every later step cheap on a CPU),
its attention projection [B, P, A] is computed, and h0/c0 come from the mean position.

Per word (`AttentionDecoder.step`): additive attention from the top hidden state over the P
positions gives weights alpha [B, P]; their weighted context is gated by a sigmoid of the hidden
state (beta); the LSTM cell reads [word embedding; gated context]; the output layer reads the new
hidden state after dropout. Teacher forcing runs that step over whole captions in one loop
(`forward`); `AttentionStep` runs it once with the same parameters and no time axis (decoding,
export). Training adds the doubly stochastic regularisation lambda * mean_p (1 - sum_t alpha_tp)^2,
which asks every position to be looked at about once over a caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capcli.model.pooled import LstmConfig, lstm_step

KIND = "attention"


@dataclass(frozen=True)
class AttentionConfig(LstmConfig):
    # feature_dim is C, the backbone grid's channels
    context_dim: int = 256  # C': grid channels after the per-image projection
    attention_dim: int = 256  # A: size of the additive attention's hidden layer
    attention_reg: float = 1.0  # lambda of the doubly stochastic regularisation


class AttentionDecoder(nn.Module):
    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        # Grid channels differ in scale between backbones: normalising each position keeps one
        # learning rate good for all of them (as the pooled decoder does for its vector).
        self.feature_norm = nn.LayerNorm(cfg.feature_dim)
        self.project = nn.Linear(cfg.feature_dim, cfg.context_dim)
        self.att_grid = nn.Linear(cfg.context_dim, cfg.attention_dim)
        self.att_hidden = nn.Linear(cfg.hidden_dim, cfg.attention_dim, bias=False)
        self.att_score = nn.Linear(cfg.attention_dim, 1)
        self.gate = nn.Linear(cfg.hidden_dim, cfg.context_dim)
        self.init_h = nn.Linear(cfg.context_dim, cfg.num_layers * cfg.hidden_dim)
        self.init_c = nn.Linear(cfg.context_dim, cfg.num_layers * cfg.hidden_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)
        # Used one step at a time through `lstm_step` (attention needs h_{t-1} before step t).
        self.lstm = cfg.lstm(cfg.embed_dim + cfg.context_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def encode(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grid [B, P, C] -> (context grid [B, P, C'], its attention projection [B, P, A], h0, c0 [layers, B, H])."""
        context = self.dropout(self.project(self.feature_norm(grid.float())))
        projection = self.att_grid(context)
        mean = context.mean(dim=1)
        shape = (grid.shape[0], self.cfg.num_layers, self.cfg.hidden_dim)
        h = torch.tanh(self.init_h(mean)).view(shape).transpose(0, 1).contiguous()
        c = self.init_c(mean).view(shape).transpose(0, 1).contiguous()
        return context, projection, h, c

    def attend(
        self, h_top: torch.Tensor, context: torch.Tensor, projection: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top hidden state [B, H] -> (gated context [B, C'], attention weights alpha [B, P])."""
        scores = self.att_score(torch.tanh(projection + self.att_hidden(h_top).unsqueeze(1))).squeeze(-1)
        alpha = torch.softmax(scores, dim=-1)
        attended = torch.bmm(alpha.unsqueeze(1), context).squeeze(1)
        return torch.sigmoid(self.gate(h_top)) * attended, alpha

    def step(
        self,
        embedded: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor,
        projection: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One word: embedded input [B, E], state -> (new top hidden [B, H], h', c', alpha [B, P])."""
        gated, alpha = self.attend(h[-1], context, projection)
        h, c = lstm_step(self.lstm, torch.cat([embedded, gated], dim=1), h, c)
        return h[-1], h, c, alpha

    def forward(
        self, grid: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: grids [U, P, C], input tokens [N, T] -> (logits [N, T, V], alphas [N, T, P]).

        `rows` [N] says which grid each caption belongs to (default: one grid per caption), so an image
        with several captions in a batch is encoded once. Padding sits at the end of each row and the
        recurrence is causal, so real positions never see it: captions run longest first and each step
        computes only those not yet ended (as packed sequences do), which skips the padding's share of
        the work. Padded positions come back as zeros; loss and regularisation mask them.
        """
        n, steps = tokens.shape
        lengths = (tokens != self.cfg.pad_id).sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        running = (lengths.unsqueeze(0) > torch.arange(steps, device=tokens.device).unsqueeze(1)).sum(1).tolist()
        running = [m for m in running if m > 0]
        context, projection, h, c = self.encode(grid)
        # index_select, not [rows]: its backward (index_add) sums repeated rows in a fixed order on CPU,
        # where advanced indexing's accumulate is multithreaded and makes runs differ.
        rows = order if rows is None else rows.index_select(0, order)
        context, projection = context.index_select(0, rows), projection.index_select(0, rows)
        h, c = h.index_select(1, rows), c.index_select(1, rows)
        embedded = self.dropout(self.embed(tokens.index_select(0, order)))
        loop = self._single_layer_steps if self.cfg.num_layers == 1 else self._steps
        hidden, alphas = loop(embedded, h, c, context, projection, running)
        where = torch.cat([order[:m] * steps + t for t, m in enumerate(running)])
        logits = self.out(self.dropout(torch.cat(hidden)))
        logits = logits.new_zeros(n * steps, logits.shape[-1]).index_copy(0, where, logits)
        alpha = torch.cat(alphas)
        alpha = alpha.new_zeros(n * steps, alpha.shape[-1]).index_copy(0, where, alpha)
        return logits.view(n, steps, -1), alpha.view(n, steps, -1)

    def _steps(self, embedded, h, c, context, projection, running):
        """The teacher-forced loop through `step` itself (any number of layers)."""
        hidden, alphas = [], []
        for t, m in enumerate(running):
            top, h, c, alpha = self.step(embedded[:m, t], h[:, :m], c[:, :m], context[:m], projection[:m])
            hidden.append(top)
            alphas.append(alpha)
        return hidden, alphas

    def _single_layer_steps(self, embedded, h, c, context, projection, running):
        """The same loop as `_steps` for one LSTM layer, arranged for speed on a CPU (same function, same weights).

        Training time goes to many small per-step operations, so: the word embeddings' share of the LSTM
        gates is one matrix product for all steps; the three products of the previous hidden state
        (LSTM recurrence, attention query, gate) are one; and the per-image tensors are cut to the running
        captions only when that number changes, since every cut costs a full-size zero tensor in backward.
        """
        lstm, hidden_dim, embed_dim = self.lstm, self.cfg.hidden_dim, self.cfg.embed_dim
        w_word, w_context = lstm.weight_ih_l0.split([embed_dim, lstm.input_size - embed_dim], dim=1)
        word_gates = (embedded @ w_word.t() + (lstm.bias_ih_l0 + lstm.bias_hh_l0)).transpose(0, 1).unbind(0)
        w_h = torch.cat([lstm.weight_hh_l0, self.att_hidden.weight, self.gate.weight])
        if torch.is_autocast_enabled(embedded.device.type):  # cast once here, not in every step's product
            dtype = torch.get_autocast_dtype(embedded.device.type)
            w_h, w_context = w_h.to(dtype), w_context.to(dtype)
        splits = [4 * hidden_dim, self.cfg.attention_dim, self.cfg.context_dim]
        h, c = h[0], c[0]
        hidden, alphas, cut = [], [], None
        for t, m in enumerate(running):
            if cut is None or cut[0] != m:
                cut = (m, context[:m], projection[:m])
            _, ctx, proj = cut
            h, c = h[:m], c[:m]
            recurrent, query, gate = (h @ w_h.t()).split(splits, dim=1)
            scores = self.att_score(torch.tanh(proj + query.unsqueeze(1))).squeeze(-1)
            alpha = torch.softmax(scores, dim=-1)
            attended = torch.bmm(alpha.unsqueeze(1), ctx).squeeze(1)
            gated = torch.sigmoid(gate + self.gate.bias) * attended
            gates = word_gates[t][:m] + recurrent + gated @ w_context.t()
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hidden.append(h)
            alphas.append(alpha)
        return hidden, alphas


def doubly_stochastic(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over captions and positions of (1 - sum over real steps of alpha)^2; alphas [N, T, P], mask [N, T]."""
    coverage = (alphas.float() * mask.unsqueeze(-1)).sum(dim=1)
    return ((1.0 - coverage) ** 2).mean()


class AttentionStep(nn.Module):
    """One decoding step: (tokens [B], h, c, context [B,P,C'], projection [B,P,A]) -> (log_probs, h', c', alpha)."""

    def __init__(self, decoder: AttentionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(
        self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor, context: torch.Tensor, projection: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        top, h, c, alpha = self.decoder.step(self.decoder.embed(tokens), h, c, context, projection)
        return torch.log_softmax(self.decoder.out(top), dim=-1), h, c, alpha


class AttentionEncoder(nn.Module):
    """Grid backbone + the decoder's per-image part: images -> (context, projection, h0, c0). The exported encoder.

    A backbone that returns (grid, class probabilities) (`capcli.model.finetune.grid_extractor` with classes)
    makes the probabilities a fifth output, computed in the same pass."""

    def __init__(self, grid_backbone: nn.Module, decoder: AttentionDecoder):
        super().__init__()
        self.backbone = grid_backbone
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(images)
        if isinstance(out, tuple):
            grid, probs = out
            return (*self.decoder.encode(grid_positions(grid)), probs)
        return self.decoder.encode(grid_positions(out))


def grid_positions(grid: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, P, C] with P = H*W in row-major order (row y, column x is position y*W + x)."""
    return grid.flatten(2).transpose(1, 2)
