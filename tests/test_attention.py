"""The attention decoder: one step equals teacher forcing, shared grids, masking and its regulariser."""

from __future__ import annotations

import pytest
import torch

from capcli.model.attention import (
    AttentionConfig,
    AttentionDecoder,
    AttentionEncoder,
    AttentionStep,
    doubly_stochastic,
    grid_positions,
)


def decoder(layers: int = 1, **cfg) -> AttentionDecoder:
    torch.manual_seed(0)
    config = AttentionConfig(feature_dim=12, vocab_size=30, embed_dim=8, hidden_dim=10, num_layers=layers,
                             context_dim=6, attention_dim=5, **cfg)
    return AttentionDecoder(config).eval()


@pytest.mark.parametrize("layers", [1, 2])
def test_step_equals_teacher_forced_forward(layers):
    model = decoder(layers)
    grid, tokens = torch.randn(4, 9, 12), torch.randint(1, 30, (4, 7))
    lengths = torch.tensor([4, 7, 1, 6])  # unsorted: teacher forcing runs them longest first and puts them back
    real = torch.arange(7) < lengths.unsqueeze(1)
    tokens[~real] = 0
    with torch.no_grad():
        logits, alphas = model(grid, tokens)
        full = torch.log_softmax(logits, -1)
        step = AttentionStep(model)
        context, projection, h, c = model.encode(grid)
        stepped, weights = [], []
        for t in range(tokens.shape[1]):
            lp, h, c, alpha = step(tokens[:, t], h, c, context, projection)
            stepped.append(lp)
            weights.append(alpha)
    stepped, weights = torch.stack(stepped, 1), torch.stack(weights, 1)
    assert torch.allclose(stepped[real], full[real], atol=1e-5)
    assert torch.allclose(weights[real], alphas[real], atol=1e-6)
    assert alphas.shape == (4, 7, 9) and torch.allclose(alphas.sum(-1), real.float(), atol=1e-5)
    assert not logits[~real].any(), "padded positions are left at zero"


def test_rows_share_one_encoding_per_image():
    model = decoder()
    grids, tokens = torch.randn(2, 9, 12), torch.randint(0, 30, (5, 6))
    rows = torch.tensor([0, 0, 1, 0, 1])
    with torch.no_grad():
        shared = model(grids, tokens, rows)
        repeated = model(grids[rows], tokens)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(shared, repeated, strict=True))


def test_padding_does_not_change_real_positions():
    model = decoder()
    grid = torch.randn(1, 9, 12)
    with torch.no_grad():
        short = model(grid, torch.tensor([[1, 5, 6]]))
        padded = model(grid, torch.tensor([[1, 5, 6, 0, 0]]))
    assert torch.allclose(short[0], padded[0][:, :3], atol=1e-6)
    assert torch.allclose(short[1], padded[1][:, :3], atol=1e-6)


def test_attention_looks_where_the_grid_differs():
    """The weights are the model's: scaling one position's projection changes where it looks."""
    model = decoder()
    grid = torch.randn(2, 9, 12)
    with torch.no_grad():
        context, projection, h, c = model.encode(grid)
        _, alpha = model.attend(h[-1], context, projection)
        bumped = projection.clone()
        bumped[:, 4] += 10 * torch.sign(model.att_score.weight[0])  # raise position 4's score
        _, alpha_bumped = model.attend(h[-1], context, bumped)
    assert bool((alpha_bumped[:, 4] > alpha[:, 4]).all()) and bool((alpha_bumped.argmax(1) == 4).all())


def test_doubly_stochastic_regularisation_counts_real_steps_only():
    alphas = torch.zeros(1, 3, 2)
    alphas[0, :, 0] = 1.0  # every step looks at position 0
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third step is padding
    # coverage: position 0 -> 2, position 1 -> 0: ((1-2)^2 + (1-0)^2) / 2
    assert doubly_stochastic(alphas, mask).item() == pytest.approx(1.0)
    alphas[0, :2] = 0.5
    assert doubly_stochastic(alphas, mask).item() == pytest.approx(0.0)


def test_encoder_flattens_the_grid_row_major():
    grid = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)  # B=2, C=3, H=2, W=4
    positions = grid_positions(grid)
    assert positions.shape == (2, 8, 3)
    assert torch.equal(positions[1, 1 * 4 + 2], grid[1, :, 1, 2])  # row 1, column 2

    model = decoder()
    backbone = torch.nn.Conv2d(3, 12, 3, stride=4, padding=1)  # 12x12 -> 3x3 = 9 positions
    images = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        outputs = AttentionEncoder(backbone, model)(images)
        expected = model.encode(grid_positions(backbone(images)))
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert [tuple(t.shape) for t in outputs] == [(2, 9, 6), (2, 9, 5), (1, 2, 10), (1, 2, 10)]
