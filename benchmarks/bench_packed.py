"""Attention teacher forcing, packed (each step runs only the captions not yet ended) vs padded (every caption
runs to the batch's longest): training steps per second on the demo's real captions, timed in turn in one run.

Batches are the training loop's own (captions of a few images grouped, trimmed to the longest), with random
grids of the demo's shape (efficientnet_lite0: 7x7 x 1280) and decoder sizes close to the demo's (hidden 256,
context 128, attention 128; the demo's attention size is 64). The padded variant is the same module stepping
over every position, which is what training did before packing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def padded_forward(model, grid, tokens, rows):
    context, projection, h, c = model.encode(grid)
    context, projection = context.index_select(0, rows), projection.index_select(0, rows)
    h, c = h.index_select(1, rows), c.index_select(1, rows)
    embedded = model.dropout(model.embed(tokens))
    hidden, alphas = [], []
    for t in range(tokens.shape[1]):
        top, h, c, alpha = model.step(embedded[:, t], h, c, context, projection)
        hidden.append(top)
        alphas.append(alpha)
    return model.out(model.dropout(torch.stack(hidden, dim=1))), torch.stack(alphas, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=5_000, help="synthetic images (the demo's)")
    ap.add_argument("--batches", type=int, default=40, help="training batches per timing")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from capcli.data.readers import load_dataset
    from capcli.data.synthetic import default_synthetic
    from capcli.data.text import build_vocabulary
    from capcli.model.attention import AttentionConfig, AttentionDecoder
    from capcli.train.batches import grouped_order
    from capcli.train.loop import caption_loss, trim

    ds = load_dataset(str(default_synthetic(n_images=args.images, seed=0)), seed=0)
    vocab = build_vocabulary(ds, 5)
    names = ds.splits["train"]
    caps = [(i, vocab.encode(c, max_len=20)) for i, n in enumerate(names) for c in ds.captions[n]]
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for _, t in caps], batch_first=True,
                                             padding_value=vocab.pad_id)
    rows = torch.tensor([i for i, _ in caps])
    order = grouped_order(rows, torch.Generator().manual_seed(0))
    batches = list(order.split(64))[: args.batches]
    cfg = AttentionConfig(feature_dim=1280, vocab_size=len(vocab), embed_dim=128, hidden_dim=256,
                          context_dim=128, attention_dim=128, pad_id=vocab.pad_id)
    torch.manual_seed(0)
    model = AttentionDecoder(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    inputs = []
    for idx in batches:
        unique, inverse = torch.unique(rows[idx], return_inverse=True)
        inputs.append((torch.randn(len(unique), 49, 1280).half(), inverse, trim(tokens[idx], vocab.pad_id)))
    real = sum(int((t[:, 1:] != vocab.pad_id).sum()) for _, _, t in inputs)
    slots = sum(t[:, 1:].numel() for _, _, t in inputs)

    def epoch(forward) -> float:
        model.forward = forward
        start = time.perf_counter()
        for grid, inverse, toks in inputs:
            loss, _, _ = caption_loss(model, {"grid": grid, "rows": inverse}, toks, vocab.pad_id, 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    packed = AttentionDecoder.forward.__get__(model)
    padded = padded_forward.__get__(model)
    epoch(packed), epoch(padded)  # warm-up
    times = {"packed": [], "padded": []}
    for _ in range(args.reps):
        times["packed"].append(epoch(packed))
        times["padded"].append(epoch(padded))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(inputs)} batches of 64 captions: {real} real tokens in {slots} padded positions "
          f"({100 * (1 - real / slots):.0f} % padding), {torch.get_num_threads()} torch threads")
    for k, v in med.items():
        print(f"{k:7} {v:6.2f} s  {real / v:8,.0f} tokens/s")
    print(f"packed / padded speed: {med['padded'] / med['packed']:.2f}x")


if __name__ == "__main__":
    main()
