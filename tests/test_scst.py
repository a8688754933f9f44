"""Self-critical training: the torch rollouts, the policy-gradient step, the run folder, resume and refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capcli.cli.app import app
from capcli.data.text import Vocabulary
from capcli.errors import CapcliError
from capcli.model import checkpoint, decoders
from capcli.model.pooled import CaptionDecoder, DecoderConfig
from capcli.train.cider import CiderD
from capcli.train.rollout import rollout, start, step
from capcli.train.scst import ScstConfig, baselines, scst, scst_loss

runner = CliRunner()


def sequence_log_probs(decoder, features, tokens, start_id, end_id, never) -> torch.Tensor:
    """Log-probability of given captions (rows of `tokens`, <end>-terminated) under the rollout's policy."""
    state = start(decoder, features)
    total = torch.zeros(len(tokens))
    previous = torch.full((len(tokens),), start_id)
    running = torch.ones(len(tokens), dtype=torch.bool)
    for t in range(tokens.shape[1]):
        logits, state = step(decoder, previous, state)
        banned = [*never, end_id] if t == 0 else list(never)
        logp = torch.log_softmax(logits.index_fill(1, torch.tensor(banned), float("-inf")), -1)
        total += torch.where(running, logp.gather(1, tokens[:, t : t + 1]).squeeze(1), 0.0)
        running &= tokens[:, t] != end_id
        previous = tokens[:, t]
    return total


def test_policy_gradient_step_makes_higher_reward_captions_likelier():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "blue", "circle", "square", "big"], 1)
    refs = {"x": ["a red circle", "a big red circle"], "y": ["a blue square"], "z": ["a big blue square"]}
    cider = CiderD(refs)
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(feature_dim=6, vocab_size=len(vocab), embed_dim=8, hidden_dim=16,
                                           dropout=0.0)).eval()
    features = torch.randn(1, 6)
    args = (1, 2, (0, 1), 5)
    drawn = rollout(decoder, features, *args, samples=16, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor(cider.scores(["x"] * 16, drawn.words(vocab)))
    assert rewards.max() > rewards.min()  # the draws differ in reward
    advantage = rewards - baselines("mean", rewards, None, 16)
    before = sequence_log_probs(decoder, features.expand(16, -1), drawn.tokens, *args[:3]).detach()
    assert torch.allclose(before, (drawn.log_probs * drawn.mask).sum(1).detach(), atol=1e-5)
    opt = torch.optim.SGD(decoder.parameters(), lr=0.05)
    scst_loss(drawn.log_probs, drawn.mask, advantage).backward()
    opt.step()
    after = sequence_log_probs(decoder, features.expand(16, -1), drawn.tokens, *args[:3]).detach()
    best, worst = int(rewards.argmax()), int(rewards.argmin())
    assert after[best] > before[best]
    assert after[worst] < before[worst]
    assert float((advantage * (after - before)).sum()) > 0


def test_mean_baseline_is_the_other_samples_mean_and_greedy_repeats_per_image():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert baselines("mean", rewards, None, 3).tolist() == [2.5, 2.0, 1.5, 5.5, 5.0, 4.5]
    assert baselines("greedy", rewards, torch.tensor([7.0, 8.0]), 3).tolist() == [7, 7, 7, 8, 8, 8]


@pytest.mark.parametrize("run", ["tiny_run", "tiny_attention_run"])
def test_greedy_rollout_gives_the_captions_of_decode_greedy(run, request):
    from capcli.decode import greedy
    from capcli.model.steps import torch_step

    ckpt = checkpoint.load(request.getfixturevalue(run))
    decoder = decoders.load(ckpt)
    vocab_ids = ckpt["vocab"]["itos"]
    torch.manual_seed(1)
    dim = decoder.cfg.feature_dim
    features = torch.randn(6, 49, dim) if decoders.kind_of(ckpt) == "attention" else torch.randn(6, dim)
    start_id, end_id = vocab_ids.index("<start>"), vocab_ids.index("<end>")
    never = (vocab_ids.index("<pad>"), start_id)
    with torch.no_grad():
        ours = rollout(decoder, features, start_id, end_id, never, max_len=20)
    state, context = decoders.start(decoder, features)
    theirs = greedy(torch_step(decoder), state, start_id, end_id, context=context, never=never)
    for row, hyp in zip(ours.tokens.tolist(), theirs, strict=True):
        assert row[: len(hyp.tokens)] == hyp.tokens
        assert len(row) == len(hyp.tokens) or row[len(hyp.tokens)] == end_id


def small(run, **options) -> ScstConfig:
    return ScstConfig(run=str(run), batch_size=32, samples=3, val_sample=12, device="cpu", **options)


def test_scst_resumed_mid_run_ends_where_an_uninterrupted_one_does(tiny_run, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    shutil.copytree(tiny_run, whole)
    shutil.copytree(tiny_run, halves)
    scst(small(whole, epochs=2, baseline="mean"), show_progress=False)
    scst(small(halves, epochs=1, baseline="mean"), show_progress=False)
    first = checkpoint.load(halves / "scst" / "last.pt")
    assert first["epoch"] == 0 and len(first["history"]) == 1
    scst(small(halves, epochs=2), show_progress=False)  # continues with the saved settings (mean baseline)
    a, b = checkpoint.load(whole / "scst" / "last.pt"), checkpoint.load(halves / "scst" / "last.pt")
    assert b["epoch"] == 1 and b["scst_config"]["baseline"] == "mean"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    timing = {"images_per_s", "epoch_seconds"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in a["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in b["history"]]
    with pytest.raises(CapcliError, match="--baseline 'greedy' \\(it has 'mean'\\)"):
        scst(small(halves, epochs=3, baseline="greedy", given=("baseline",)), show_progress=False)


def test_scst_refuses_a_run_without_a_cross_entropy_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CapcliError, match="no cross-entropy checkpoint"):
        scst(ScstConfig(run=str(tmp_path / "empty")), show_progress=False)
    result = runner.invoke(app, ["scst", str(tmp_path / "missing")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no run folder") and "Traceback" not in result.output


@pytest.mark.parametrize("args, words", [
    (["--samples", "0"], "--samples must be an integer from 1 to 64"),
    (["--baseline", "best"], "--baseline must be greedy or mean"),
    (["--baseline", "mean", "--samples", "1"], "--samples must be at least 2 with --baseline mean"),
    (["--lr", "-1"], "--lr must be a finite number above 0"),
])
def test_bad_options_are_one_line(tmp_path, args, words):
    result = runner.invoke(app, ["scst", str(tmp_path), *args])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and words in result.output


def test_cli_end_to_end_on_an_attention_run(tiny_attention_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_attention_run, run)
    xe_bytes = (run / "best.pt").read_bytes()
    result = runner.invoke(app, ["scst", str(run), "--epochs", "2", "--batch-size", "32", "--samples", "3",
                                 "--val-sample", "12", "--lr", "1e-3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (run / "best_xe.pt").read_bytes() == xe_bytes
    history = [json.loads(line) for line in (run / "scst" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_reward"]) and 0 <= h["val_cider"] for h in history)
    assert "val_cider" in (run / "scst" / "metrics.csv").read_text().splitlines()[0]
    best = checkpoint.load(run / "best.pt")
    last = checkpoint.load(run / "scst" / "last.pt")
    if any(h["best"] for h in history):
        assert best["stage"] == "scst" and best["scst"]["val_cider"] > last["xe_scores"]["val_cider"]
        assert "best.pt is SCST epoch" in result.output
    else:
        assert (run / "best.pt").read_bytes() == xe_bytes
    assert decoders.kind_of(best) == "attention" and checkpoint.build_decoder(best) is not None
    # a rerun with the epochs done is a no-op that keeps everything
    again = runner.invoke(app, ["scst", str(run), "--epochs", "2", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert checkpoint.load(run / "scst" / "last.pt")["epoch"] == 1
