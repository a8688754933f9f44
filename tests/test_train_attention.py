"""Training the attention decoder, and pooled/attention checkpoints that can never be mistaken for each other."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from capcli.cli import app
from capcli.errors import CapcliError
from capcli.model import checkpoint, decoders
from capcli.model.attention import AttentionDecoder
from capcli.model.pooled import CaptionDecoder
from capcli.train.batches import batches_for_rank
from capcli.train.config import TrainConfig
from capcli.train.loop import train


def _config(run, small_synthetic, **overrides) -> TrainConfig:
    base = TrainConfig(backbone="efficientnet_lite0", dataset=str(small_synthetic), weights="imagenet", out=str(run),
                       epochs=3, batch_size=32, embed_dim=32, hidden_dim=64, context_dim=32, attention_dim=32,
                       threshold=2, val_sample=20, device="cpu", workers=0, resume=True)
    return replace(base, **overrides)


def test_attention_run_records_its_kind_and_grid(tiny_attention_run):
    ckpt = checkpoint.load(tiny_attention_run)
    assert ckpt["decoder"] == "attention" and ckpt["feature_dim"] == 1280
    assert ckpt["grid"] == {"channels": 1280, "height": 7, "width": 7}
    assert ckpt["config"]["context_dim"] == 32 and ckpt["config"]["attention_reg"] == 1.0
    assert isinstance(checkpoint.build_decoder(ckpt), AttentionDecoder)
    history = [json.loads(line) for line in (tiny_attention_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert all(h["attention_penalty"] > 0 and h["tokens_per_s"] > 0 for h in history)
    assert "grid" in json.loads((tiny_attention_run / "config.json").read_text())["features"]


def test_resume_keeps_the_runs_decoder_and_refuses_the_other(tiny_attention_run, tmp_path, small_synthetic):
    run = tmp_path / "run"
    shutil.copytree(tiny_attention_run, run)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(CapcliError, match=r"options differ: --decoder 'pooled' \(the run has 'attention'\)"):
        train(_config(run, small_synthetic, decoder="pooled"), show_progress=False)
    assert (run / "last.pt").read_bytes() == before
    train(_config(run, small_synthetic), show_progress=False)  # no --decoder: the run's own
    after = checkpoint.load(run / "last.pt")
    assert after["decoder"] == "attention" and len(after["history"]) == 3


def test_resume_of_a_pooled_run_as_attention_is_refused(tiny_run, tmp_path, small_synthetic):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(CapcliError, match=r"--decoder 'attention' \(the run has 'pooled'\)"):
        train(_config(run, small_synthetic, decoder="attention"), show_progress=False)
    # A run from before decoder kinds records none: it is pooled, and still refused as attention.
    old = checkpoint.load(run / "last.pt")
    old.pop("decoder")
    for option in ("decoder", "context_dim", "attention_dim", "attention_reg"):
        old["train_config"].pop(option)
    checkpoint.save(run / "last.pt", {k: v for k, v in old.items() if k != "format"})
    with pytest.raises(CapcliError, match="trained with the pooled decoder, not attention; use --decoder pooled"):
        train(_config(run, small_synthetic, decoder="attention"), show_progress=False)


def test_checkpoints_of_one_kind_never_load_as_the_other(tiny_run, tiny_attention_run):
    attention, pooled = checkpoint.load(tiny_attention_run), checkpoint.load(tiny_run)
    assert decoders.kind_of(pooled) == "pooled" and isinstance(checkpoint.build_decoder(pooled), CaptionDecoder)
    relabelled = {**attention, "decoder": "pooled"}
    with pytest.raises(CapcliError, match="fields a pooled decoder does not know .* looks like an attention"):
        checkpoint.build_decoder(relabelled)
    unlabelled = {k: v for k, v in attention.items() if k != "decoder"}  # as a checkpoint from before kinds
    with pytest.raises(CapcliError, match="fields a pooled decoder does not know"):
        checkpoint.build_decoder(unlabelled)
    with pytest.raises(CapcliError, match="fields an attention decoder does not know .*feature_input"):
        checkpoint.build_decoder({**pooled, "decoder": "attention"})
    wrong_weights = {**attention, "model": {k: v for k, v in attention["model"].items() if k != "gate.weight"}}
    with pytest.raises(CapcliError, match="weights do not fit an attention decoder: .*gate.weight"):
        checkpoint.build_decoder(wrong_weights)
    with pytest.raises(CapcliError, match="unknown decoder kind 'transformer'"):
        checkpoint.build_decoder({**attention, "decoder": "transformer"})
    with pytest.raises(CapcliError, match="trained with the attention decoder, not pooled"):
        checkpoint.check_matches(attention, "efficientnet_lite0", 1280, decoder="pooled")


def test_attention_on_a_backbone_without_a_grid_is_one_clear_line(monkeypatch, small_synthetic, tmp_path):
    import capcli.registry

    real = capcli.registry.get_backbone

    def without_grid(name):
        spec = real("efficientnet_lite0")
        return replace(spec, name=name, grid=None, grid_builder=None) if name == "flatnet" else real(name)

    monkeypatch.setattr(capcli.registry, "get_backbone", without_grid)
    result = CliRunner().invoke(app, ["train", "--backbone", "flatnet", "--decoder", "attention", "--dataset",
                                      str(small_synthetic), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "backbone 'flatnet' declares no feature grid" in lines[0], result.stderr
    assert "--decoder pooled" in lines[0] and "Traceback" not in result.output


def test_feature_input_is_a_pooled_option(small_synthetic, tmp_path):
    with pytest.raises(CapcliError, match="--feature-input is an option of the pooled decoder"):
        train(_config(tmp_path / "x", small_synthetic, decoder="attention", feature_input=True, resume=False),
              show_progress=False)


def test_unknown_decoder_is_refused(small_synthetic, tmp_path):
    with pytest.raises(CapcliError, match="--decoder must be pooled or attention \\(got 'lstm'\\)"):
        train(_config(tmp_path / "x", small_synthetic, decoder="lstm", resume=False), show_progress=False)


def test_grouped_batches_keep_an_images_captions_together():
    rows = torch.arange(40).repeat_interleave(5)  # 40 images, 5 captions each, in table order
    batches = batches_for_rank(len(rows), 25, epoch_seed=3, rank=0, world=1, groups=rows)
    assert sorted(torch.cat(batches).tolist()) == list(range(200))
    assert all(len(set(rows[b].tolist())) == 5 for b in batches)  # 25 captions = exactly 5 whole images
    images = [rows[b].tolist()[::5] for b in batches]
    assert [i for chunk in images for i in chunk] != list(range(40))  # images in shuffled order
    ddp = [batches_for_rank(len(rows), 25, epoch_seed=3, rank=r, world=2, groups=rows) for r in range(2)]
    assert len(ddp[0]) == len(ddp[1]) and not set(torch.cat(ddp[0]).tolist()) & set(torch.cat(ddp[1]).tolist())
