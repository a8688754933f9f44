"""The run folder: nothing left behind by a run refused or failing before training, a run killed before its first
checkpoint trained into again, and a run that went on with self-critical training never resumed as cross-entropy."""

from __future__ import annotations

import json

import pytest

from capcli.errors import CapcliError
from capcli.train.config import TrainConfig
from capcli.train.loop import train


def tiny(small_synthetic, out, **options) -> TrainConfig:
    return TrainConfig(**{"backbone": "efficientnet_lite0", "dataset": str(small_synthetic), "weights": "imagenet",
                          "out": str(out), "epochs": 1, "batch_size": 32, "embed_dim": 32, "hidden_dim": 64,
                          "context_dim": 32, "attention_dim": 32, "threshold": 2, "val_sample": 20, "device": "cpu",
                          "workers": 0, **options})


def test_a_run_failing_before_training_leaves_no_folder(small_synthetic, tmp_path):
    bad_weights = tmp_path / "weights.pt"
    bad_weights.write_text("not a state dict")
    with pytest.raises(CapcliError):
        train(tiny(small_synthetic, tmp_path / "run", weights=str(bad_weights)), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_a_run_killed_before_its_first_checkpoint_can_be_trained_into_again(small_synthetic, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # what a run killed in its first epoch leaves
    (run / "vocab.json").write_text("{}")
    with pytest.raises(CapcliError, match="stopped before its first epoch ended; train into it again"):
        train(tiny(small_synthetic, run, resume=True), show_progress=False)
    train(tiny(small_synthetic, run), show_progress=False)
    assert (run / "last.pt").is_file() and json.loads((run / "config.json").read_text())["train"]["epochs"] == 1


def test_another_file_in_the_folder_still_refuses_it(small_synthetic, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(CapcliError, match="exists and is not empty"):
        train(tiny(small_synthetic, run), show_progress=False)
    assert (run / "notes.txt").read_text() == "mine"


def test_a_run_after_scst_is_not_resumed_as_cross_entropy(small_synthetic, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "scst").mkdir()
    for name in ("last.pt", "best.pt", "best_xe.pt", "scst/last.pt"):  # an SCST epoch saved
        (run / name).write_bytes(b"")
    with pytest.raises(CapcliError, match="went on with self-critical training"):
        train(tiny(small_synthetic, run, resume=True), show_progress=False)
