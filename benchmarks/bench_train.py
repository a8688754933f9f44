"""Training tokens/s: whole captions in one forward vs the per-prefix scheme, and vs the fp32 matmul peak.

The per-prefix scheme (the classic Keras recipe) turns every caption of length T into T samples
(prefix padded to max length -> next word) and runs the LSTM over each padded prefix. Both schemes
here train the same decoder on the same captions and features; tokens/s counts predicted words.
The attention decoder (Show, Attend and Tell) is timed on the same captions over a 7x7 grid of the same
channels, with its doubly stochastic regulariser, as `capcli train --decoder attention` runs it.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from capcli.model.attention import AttentionConfig, AttentionDecoder
from capcli.model.pooled import CaptionDecoder, DecoderConfig
from capcli.train.loop import caption_loss


def synthetic_batch(n_captions: int, max_len: int, vocab: int, feature_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, max_len - 1, (n_captions,), generator=g)
    tokens = torch.zeros(n_captions, max_len + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = 1
        tokens[i, 1 : n + 1] = torch.randint(4, vocab, (n,), generator=g)
        tokens[i, n + 1] = 2
    return torch.randn(n_captions, feature_dim, generator=g), tokens


def whole_caption_step(model, opt, feats, tokens):
    logits = model(feats, tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return int((tokens[:, 1:] != 0).sum())


def per_prefix_samples(feats, tokens):
    """Every (feature, padded prefix) -> next word sample, as the per-prefix scheme builds them."""
    rows, prefixes, targets = [], [], []
    width = tokens.shape[1] - 1
    for i in range(tokens.shape[0]):
        n = int((tokens[i] != 0).sum())
        for t in range(1, n):
            prefix = torch.zeros(width, dtype=torch.long)
            prefix[:t] = tokens[i, :t]
            rows.append(i)
            prefixes.append(prefix)
            targets.append(tokens[i, t])
    return torch.tensor(rows), torch.stack(prefixes), torch.stack(targets)


def per_prefix_step(model, opt, feats, prefixes, lengths, targets):
    logits = model(feats, prefixes)  # the LSTM runs over the whole padded prefix
    last = logits[torch.arange(len(lengths)), lengths - 1]
    loss = F.cross_entropy(last, targets)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return len(targets)


def attention_tokens_per_s(args, tokens) -> float:
    """Training tokens/s of the attention decoder on random 7x7 grids (one image per caption)."""
    cfg = AttentionConfig(feature_dim=args.feature_dim, vocab_size=args.vocab, embed_dim=256,
                          hidden_dim=args.hidden, dropout=0.0)
    grids = torch.randn(len(tokens), 49, args.feature_dim, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = AttentionDecoder(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step(sl: slice) -> int:
        loss, n_tokens, _ = caption_loss(model, {"grid": grids[sl]}, tokens[sl], 0, cfg.attention_reg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return n_tokens

    step(slice(0, 8))  # warm-up
    t, done = time.perf_counter(), 0
    for i in range(0, len(tokens), args.batch_size):
        done += step(slice(i, i + args.batch_size))
    return done / (time.perf_counter() - t)


def matmul_peak_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--captions", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--feature-dim", type=int, default=1280)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()

    cfg = DecoderConfig(feature_dim=args.feature_dim, vocab_size=args.vocab, embed_dim=256,
                        hidden_dim=args.hidden, dropout=0.0)
    feats, tokens = synthetic_batch(args.captions, args.max_len, args.vocab, args.feature_dim)

    torch.manual_seed(0)
    model = CaptionDecoder(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    whole_caption_step(model, opt, feats[:8], tokens[:8])  # warm-up
    t, done = time.perf_counter(), 0
    for i in range(0, args.captions, args.batch_size):
        done += whole_caption_step(model, opt, feats[i : i + args.batch_size], tokens[i : i + args.batch_size])
    whole_tps = done / (time.perf_counter() - t)

    rows, prefixes, targets = per_prefix_samples(feats, tokens)
    lengths = (prefixes != 0).sum(1)
    model = CaptionDecoder(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t, done = time.perf_counter(), 0
    for i in range(0, len(targets), args.batch_size):
        sl = slice(i, i + args.batch_size)
        done += per_prefix_step(model, opt, feats[rows[sl]], prefixes[sl], lengths[sl], targets[sl])
    prefix_tps = done / (time.perf_counter() - t)

    attention_tps = attention_tokens_per_s(args, tokens)

    # Forward+backward of one token costs ~3x its forward matmuls (LSTM gates + output layer).
    flops_per_token = 3 * 2 * (4 * args.hidden * (256 + args.hidden) + args.hidden * args.vocab)
    peak = matmul_peak_gflops()
    print(f"decoder hidden {args.hidden}, vocab {args.vocab}, {args.captions} captions, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"whole captions (teacher forcing, one forward): {whole_tps:10,.0f} tokens/s")
    print(f"per-prefix scheme (one sample per prefix)     : {prefix_tps:10,.0f} tokens/s")
    print(f"speed-up over per-prefix                      : {whole_tps / prefix_tps:10.1f}x")
    print(f"attention decoder, whole captions (7x7 grid)  : {attention_tps:10,.0f} tokens/s "
          f"({attention_tps / whole_tps:.2f}x the pooled decoder's)")
    print(f"fp32 matmul peak (1024^3)                     : {peak:10.1f} GFLOP/s")
    print(f"training at {whole_tps * flops_per_token / 1e9:.1f} GFLOP/s = "
          f"{100 * whole_tps * flops_per_token / 1e9 / peak:.0f}% of that peak")


if __name__ == "__main__":
    main()
