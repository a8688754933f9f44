import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from capcli.errors import CapcliError
from capcli.model import checkpoint
from capcli.train.batches import batches_for_rank
from capcli.train.config import TrainConfig
from capcli.train.loop import train


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


@pytest.mark.parametrize("decoder", ["pooled", "attention"])
def test_two_process_gloo_training_keeps_ranks_in_agreement(tiny_run, small_synthetic, tmp_path, decoder):
    # Rank 0 extracts what is not cached yet (tiny_run cached the pooled features); the other rank waits.
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "capcli", "train", "--backbone", "efficientnet_lite0", "--dataset", str(small_synthetic),
           "--epochs", "2", "--batch-size", "16", "--embed-dim", "16", "--hidden-dim", "32", "--threshold", "2",
           "--device", "cpu", "--out", str(out), "--decoder", decoder, "--context-dim", "16", "--attention-dim", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["train"]["decoder"] == decoder
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for h in history:
        assert len(h["param_checksums"]) == 2 and h["param_checksums"][0] == h["param_checksums"][1]


# --- issue 9, item 7: one option validator, a stop at a non-finite loss, a faithful resume --------------


def _cfg(small_synthetic, out, **changes) -> TrainConfig:
    """The tiny_run settings (its features are cached), with changes."""
    settings = dict(backbone="efficientnet_lite0", dataset=str(small_synthetic), weights="imagenet", out=str(out),
                    epochs=2, batch_size=32, embed_dim=32, hidden_dim=64, threshold=2, val_sample=20, device="cpu",
                    workers=0, decoder="pooled")
    return TrainConfig(**{**settings, **changes})


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_len", 0), ("max_len", -4), ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0),
     ("embed_dim", 0), ("hidden_dim", -3), ("num_layers", 0), ("dropout", 1.5), ("dropout", 1.0),
     ("workers", -1), ("epochs", 0), ("batch_size", 0), ("threshold", 0), ("patience", 0), ("seed", -1),
     ("lr_decay", 0.0), ("clip_norm", float("nan")), ("val_sample", 0), ("feature_batch_size", 0),
     ("hidden_dim", 10**9), ("embed_dim", 2.5)],
)
def test_item7_bad_option_is_refused_before_anything_is_written(small_synthetic, tmp_path, option, value):
    out = tmp_path / "run"
    cfg = _cfg(small_synthetic, out, **{option: value})
    flag = "--" + option.replace("_", "-")
    with pytest.raises(CapcliError, match=f"{flag} must be .* \\(got {value!r}\\)") as info:
        train(cfg, show_progress=False)
    assert "\n" not in str(info.value) and not out.exists()


def test_item7_every_bad_option_is_named_in_one_line(small_synthetic, tmp_path):
    cfg = _cfg(small_synthetic, tmp_path / "run", max_len=0, dropout=-0.1, num_layers=0)
    with pytest.raises(CapcliError) as info:
        cfg.validate()
    message = str(info.value)
    assert all(flag in message for flag in ("--max-len", "--dropout", "--num-layers")) and "\n" not in message
    _cfg(small_synthetic, tmp_path / "run").validate()  # the good settings pass


@pytest.mark.parametrize(
    "args",
    [["--max-len", "0"], ["--lr", "inf"], ["--embed-dim", "0"], ["--hidden-dim", "-3"], ["--num-layers", "0"],
     ["--dropout", "1.5"], ["--workers", "-1"], ["--threshold", "1000"]],
)
def test_item7_cli_bad_option_is_one_error_line(small_synthetic, tmp_path, args):
    from typer.testing import CliRunner

    from capcli.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--backbone", "efficientnet_lite0", "--dataset", str(small_synthetic),
                                      "--out", str(out), *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and args[0] in lines[0], result.stderr
    assert not out.exists()


def test_item7_threshold_that_leaves_mostly_unk_is_refused_with_a_usable_one(small_synthetic):
    import re

    from capcli.data.readers import load_dataset
    from capcli.data.text import check_coverage

    ds = load_dataset(str(small_synthetic))
    with pytest.raises(CapcliError, match="keeps 1 word") as info:
        check_coverage(ds, 1000)
    suggested = int(re.search(r"use --threshold (\d+) or lower", str(info.value))[1])
    check_coverage(ds, suggested)  # the suggestion is usable ...
    with pytest.raises(CapcliError):
        check_coverage(ds, suggested + 1)  # ... and the highest that is


def test_item7_non_finite_loss_stops_the_run_without_claiming_a_best_checkpoint(tiny_run, small_synthetic,
                                                                                tmp_path):
    from typer.testing import CliRunner

    from capcli.cli import app

    out = tmp_path / "nan"
    result = CliRunner().invoke(app, ["train", "--backbone", "efficientnet_lite0", "--dataset", str(small_synthetic),
                                      "--out", str(out), "--lr", "1e30", "--epochs", "2", "--embed-dim", "16",
                                      "--hidden-dim", "32", "--threshold", "2", "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: training stopped in epoch 1"), result.stderr
    assert "not finite" in lines[0] and "lower --lr" in lines[0] and "no checkpoint was written" in lines[0]
    assert "best.pt" not in result.stdout and not (out / "best.pt").exists()


def test_item7_divergence_after_a_good_epoch_keeps_its_checkpoints(tiny_run, small_synthetic, tmp_path,
                                                                     monkeypatch):
    import capcli.train.loop as training

    real_epoch = training.run_epoch

    def second_epoch_diverges(*args):
        stats = real_epoch(*args)
        if args[5] == 1:  # the epoch index
            stats["train_loss"] = float("nan")
        return stats

    monkeypatch.setattr(training, "run_epoch", second_epoch_diverges)
    out = tmp_path / "run"
    with pytest.raises(CapcliError, match="in epoch 2: the training loss is nan .*best.pt keeps the best epoch"):
        train(_cfg(small_synthetic, out, embed_dim=16, hidden_dim=32), show_progress=False)
    for name in ("best.pt", "last.pt"):  # the diverged epoch is never saved
        assert torch.load(out / name, map_location="cpu", weights_only=True)["epoch"] == 0


def test_item7_resume_refuses_conflicting_options_it_was_given(tiny_run, small_synthetic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    stamp = (run / "last.pt").stat().st_mtime_ns
    for option, value in (("hidden_dim", 128), ("max_len", 7), ("threshold", 3), ("backbone", "resnet152")):
        with pytest.raises(CapcliError, match=f"--{option.replace('_', '-')} {value!r} \\(the run has ") as info:
            train(_cfg(small_synthetic, run, resume=True, epochs=3, **{option: value}), show_progress=False)
        assert "\n" not in str(info.value)
    # An option set to what the run has, or only --epochs, is no conflict; the settings come from the run.
    cfg = TrainConfig(backbone="", out=str(run), resume=True, epochs=3, given=("out", "resume", "epochs"))
    train(cfg, show_progress=False)
    after = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert after["epoch"] == 2 and after["config"]["hidden_dim"] == 64 and after["max_len"] == 20
    assert (run / "last.pt").stat().st_mtime_ns != stamp


def test_item7_cli_resume_with_a_changed_hidden_dim_is_one_line(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from capcli.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(run), "--hidden-dim", "128", "--max-len", "9"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--hidden-dim 128 (the run has 64)" in lines[0] and "--max-len 9" in lines[0]
    # Without conflicting options, --resume needs only the run directory: the rest comes from the run.
    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(run), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    after = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert after["epoch"] == 2 and after["train_config"]["hidden_dim"] == 64


def _numbers(history: list[dict]) -> list[dict]:
    """What a run learned, without its timings."""
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "epoch_seconds")} for h in history]


def test_item7_resumed_run_equals_an_uninterrupted_one(tiny_run, small_synthetic, tmp_path):
    settings = dict(embed_dim=16, hidden_dim=32, dropout=0.5, batch_size=16, lr=3e-3)
    straight = train(_cfg(small_synthetic, tmp_path / "straight", epochs=2, **settings), show_progress=False)
    split = tmp_path / "split"
    train(_cfg(small_synthetic, split, epochs=1, **settings), show_progress=False)
    train(_cfg(small_synthetic, split, epochs=2, resume=True, **settings), show_progress=False)
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(split / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _numbers(a["history"]) == _numbers(b["history"])
