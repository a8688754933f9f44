"""Constrained beam search (Anderson et al. 2017, "Guided Open Vocabulary Image Captioning with Constrained Beam
Search"), for one required word per image: the caption must hold it, when a beam that holds it ends.

Each image searches two groups of K beams: those that have not placed its required word yet, and those that have.
A beam of the first group that takes the word moves to the second; a beam of the second stays there. Each group
keeps its own K best and its own finished hypotheses; an image's answer comes from the second group's, and from
the first group's only when no beam holding the word ever ended (so a caption always comes back). An image
without a required word (-1) searches the first group alone: plain beam search.
"""

from __future__ import annotations

import numpy as np

from capcli.decode.beam import Paths, advance, results_of, settled, top_k
from capcli.decode.steps import (
    Context,
    ContextStep,
    Hypothesis,
    State,
    Step,
    batch_size,
    check_options,
    run_step,
    sparse_bias,
    words_only,
)


def constrained_beam_search(
    step: Step | ContextStep,
    state: State,
    start_id: int,
    end_id: int,
    required: np.ndarray,
    beam_size: int = 3,
    max_len: int = 20,
    length_penalty: float = 1.0,
    n_best: int = 1,
    context: Context = (),
    never: tuple[int, ...] = (),
    no_repeat_ngram: int = 0,
    bias: np.ndarray | None = None,
) -> list[list[Hypothesis]]:
    """As `beam_search`, with `required` [images] the word id each image's caption must hold (-1: none)."""
    check_options(max_len, beam_size=beam_size, n_best=n_best)
    if n_best > beam_size:
        raise ValueError(f"n_best ({n_best}) cannot exceed beam_size ({beam_size})")
    b, k = batch_size(state), beam_size
    required = np.asarray(required, dtype=np.int64)
    rows = 2 * k  # per image: group 0 (word not placed) beams 0..k-1, group 1 (placed) beams k..2k-1
    state = tuple(np.repeat(s, rows, axis=1) for s in state)
    context = tuple(np.repeat(x, rows, axis=0) for x in context)
    bias = sparse_bias(np.repeat(bias, rows, axis=0)) if bias is not None else None
    beam_lp = np.full((b, rows), -np.inf)
    beam_lp[:, 0] = 0.0
    seqs = np.zeros((b, rows, 0), dtype=np.int64)
    looked = np.zeros((b, rows, 0, context[0].shape[1] if context else 0), dtype=np.float32)
    tokens = np.full(b * rows, start_id, dtype=np.int64)
    pools: list[list[list[Hypothesis]]] = [[[] for _ in range(b)] for _ in range(2)]
    done = np.zeros((2, b), dtype=bool)
    done[1, required < 0] = True
    images, has = np.arange(b), required >= 0
    for length in range(1, max_len + 1):
        log_probs, state, alpha = run_step(step, tokens, state, context)
        log_probs = words_only(log_probs, end_id, never, length, seqs.reshape(b * rows, -1), no_repeat_ngram, bias)
        vocab = log_probs.shape[1]
        total = beam_lp[:, :, None] + log_probs.reshape(b, rows, vocab)
        moving = np.full((b, k), -np.inf)  # group 0 beams taking the required word
        moving[has] = total[has, :k, required[has]]
        stay = total[:, :k].copy()
        stay[has, :, required[has]] = -np.inf
        index0, value0 = top_k(stay.reshape(b, k * vocab), k)
        index1, value1 = top_k(np.concatenate([total[:, k:].reshape(b, k * vocab), moving], axis=1), k)
        from_moving = index1 >= k * vocab
        parent1 = np.where(from_moving, index1 - k * vocab, k + index1 // vocab)
        token1 = np.where(from_moving, np.maximum(required, 0)[:, None], index1 % vocab)
        paths = Paths(seqs, looked if context else None)
        new_lp, new_parent, new_token = np.full((b, rows), -np.inf), np.zeros((b, rows), np.int64), None
        chosen = []
        for g, (parent, token, value) in enumerate(((index0 // vocab, index0 % vocab, value0),
                                                    (parent1, token1, value1))):
            lp, par, tok = advance(pools[g], done[g], paths, parent, token, value, end_id, length_penalty)
            for i in np.flatnonzero(~done[g]):
                # the first group feeds the second: it searches on while the second does
                done[g, i] = settled(pools[g][i], lp[i], length, max_len, length_penalty, n_best) and (
                    g == 1 or not has[i] or bool(done[1, i]))
            lp[done[g]] = -np.inf
            new_lp[:, g * k : (g + 1) * k], new_parent[:, g * k : (g + 1) * k] = lp, par
            chosen.append(tok)
        new_token = np.concatenate(chosen, axis=1)
        beam_lp = new_lp
        flat = (images[:, None] * rows + new_parent).ravel()
        state = tuple(s[:, flat] for s in state)  # context rows of one image are copies: no re-indexing
        seqs = np.concatenate([seqs[images[:, None], new_parent], new_token[..., None]], axis=2)
        if alpha is not None:
            picked = alpha.reshape(b, rows, -1)[images[:, None], new_parent]
            looked = np.concatenate([looked[images[:, None], new_parent], picked[:, :, None].astype(np.float32)],
                                    axis=2)
        tokens = new_token.ravel()
        if done.all():
            break
    paths = Paths(seqs, looked if context else None)
    found = []
    for i in range(b):
        placed = results_of(pools[1][i], paths, i, np.where(np.arange(rows) >= k, beam_lp[i], -np.inf),
                            length_penalty, n_best) if has[i] else []
        found.append(placed or results_of(pools[0][i], paths, i, np.where(np.arange(rows) < k, beam_lp[i], -np.inf),
                                          length_penalty, n_best))
    return found
