import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from capcli import checkpoint
from capcli.errors import CapcliError
from capcli.train import TrainConfig, batches_for_rank, train


def test_run_directory_holds_everything(tiny_run):
    for name in ("best.pt", "last.pt", "vocab.json", "config.json", "metrics.jsonl", "metrics.csv", "curves.png"):
        assert (tiny_run / name).is_file(), name
    ckpt = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)
    for key in ("config", "model", "optimizer", "scheduler", "epoch", "vocab", "vocab_sha256", "backbone",
                "weights", "preprocessing", "history", "max_len"):
        assert key in ckpt, key
    assert ckpt["backbone"] == "efficientnet_lite0" and ckpt["weights"] == "imagenet"
    decoder = checkpoint.build_decoder(ckpt)
    assert decoder.cfg.vocab_size == len(ckpt["vocab"]["itos"])
    history = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert all(h["tokens_per_s"] > 0 and 0 <= h["val_bleu4"] <= 100 for h in history)
    csv_rows = (tiny_run / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("train_loss,") and "val_cider" in csv_rows[0] and len(csv_rows) == 3


def test_resume_continues_where_the_run_stopped(tiny_run, tmp_path, small_synthetic):
    run = tmp_path / "resumed"
    shutil.copytree(tiny_run, run)
    before = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    cfg = TrainConfig(backbone="efficientnet_lite0", dataset=str(small_synthetic), weights="imagenet",
                      out=str(run), epochs=3, batch_size=32, embed_dim=32, hidden_dim=64, threshold=2,
                      val_sample=20, device="cpu", workers=0, resume=True)
    train(cfg, show_progress=False)
    after = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert after["epoch"] == 2 and len(after["history"]) == 3
    assert after["history"][:2] == before["history"]


def test_existing_run_is_not_overwritten(tiny_run, small_synthetic):
    cfg = TrainConfig(backbone="efficientnet_lite0", dataset=str(small_synthetic), out=str(tiny_run), epochs=1)
    stamp = (tiny_run / "best.pt").stat().st_mtime_ns
    with pytest.raises(CapcliError, match="--resume"):
        train(cfg, show_progress=False)
    assert (tiny_run / "best.pt").stat().st_mtime_ns == stamp


def test_checkpoint_mismatch_is_a_clear_error(tiny_run):
    ckpt = checkpoint.load(tiny_run)
    with pytest.raises(CapcliError, match="trained on backbone 'efficientnet_lite0'"):
        checkpoint.check_matches(ckpt, "resnet152", 2048)
    with pytest.raises(CapcliError, match="1280-d features"):
        checkpoint.check_matches(ckpt, "efficientnet_lite0", 2048)
    with pytest.raises(CapcliError, match="vocabulary differs"):
        checkpoint.check_matches(ckpt, "efficientnet_lite0", 1280, "0" * 64)


def test_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CapcliError, match="cannot read checkpoint"):
        checkpoint.load(bad)


def test_rank_batches_are_disjoint_and_equal_in_number():
    parts = [batches_for_rank(103, 8, epoch_seed=5, rank=r, world=2) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    seen = [set(torch.cat(p).tolist()) for p in parts]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 51


def test_two_process_gloo_training_keeps_ranks_in_agreement(tiny_run, small_synthetic, tmp_path):
    # tiny_run has already cached the features, so rank 0 does not extract again.
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "capcli", "train", "--backbone", "efficientnet_lite0", "--dataset", str(small_synthetic),
           "--epochs", "2", "--batch-size", "16", "--embed-dim", "16", "--hidden-dim", "32", "--threshold", "2",
           "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for h in history:
        assert len(h["param_checksums"]) == 2 and h["param_checksums"][0] == h["param_checksums"][1]
