"""A run folder on disk: refused before any work when it cannot take the run, created when training starts,
and the metrics files and curves written beside the checkpoints (cross-entropy and self-critical alike)."""

from __future__ import annotations

import json
from pathlib import Path

from capcli.errors import CapcliError
from capcli.model import checkpoint
from capcli.paths import atomic_write_text


def run_dir(cfg) -> Path:
    """The run folder of a TrainConfig: --out, or runs/BACKBONE."""
    if not cfg.out and not cfg.backbone:
        raise CapcliError("give --out RUN_DIR (or --backbone, for runs/BACKBONE)")
    return Path(cfg.out or f"runs/{cfg.backbone}")


def checkpoint_to_resume(cfg) -> dict:
    out = check_run_dir(cfg)
    return checkpoint.load(out / "last.pt")


# What a run writes before its first checkpoint: a run killed then (no last.pt) holds nothing worth keeping.
UNSTARTED_RUN_FILES = frozenset({"config.json", "vocab.json"})


def check_run_dir(cfg) -> Path:
    """The run directory, refused before any work when it cannot take this run; created later (`make_run_dir`),
    so that a run refused or failing before training leaves no empty folder behind."""
    out = run_dir(cfg)
    if out.exists() and not out.is_dir():
        raise CapcliError(f"'{out}' exists and is not a folder; choose another --out")
    if (out / "best_xe.pt").exists() and not _scst_never_started(out, cfg.resume):
        raise CapcliError(f"'{out}' went on with self-critical training (capcli scst): cross-entropy training "
                          f"cannot resume there; continue it with capcli scst {out}, or start a new run with "
                          "another --out")
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if entries and not cfg.resume:
        if (out / "last.pt").exists():
            raise CapcliError(f"run directory '{out}' already holds a run; use --resume or another --out")
        if not entries <= UNSTARTED_RUN_FILES:
            raise CapcliError(f"'{out}' exists and is not empty; choose another --out")
    if cfg.resume and not (out / "last.pt").exists():
        extra = (f" (it holds only {', '.join(sorted(entries))}: a run stopped before its first epoch ended; "
                 "train into it again without --resume)") if entries and entries <= UNSTARTED_RUN_FILES else ""
        raise CapcliError(f"nothing to resume in '{out}' (no last.pt){extra}")
    return out


def _scst_never_started(out: Path, resume: bool) -> bool:
    """Whether best_xe.pt is all that an SCST stopped before its first epoch left (earlier versions copied it at
    the start): no SCST epoch saved, best.pt the same bytes. A resumed run then drops that copy and goes on."""
    import filecmp

    if (out / "scst" / "last.pt").exists() or not (out / "best.pt").is_file():
        return False
    if not filecmp.cmp(out / "best.pt", out / "best_xe.pt", shallow=False):
        return False
    if resume:
        from capcli.console import err

        (out / "best_xe.pt").unlink()
        err.print(f"note: removed {out / 'best_xe.pt'}, a copy of best.pt left by self-critical training stopped "
                  "before its first epoch ended", markup=False)
    return True


def make_run_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CapcliError(f"cannot create the run directory '{out}': {exc.strerror or type(exc).__name__}") from None
    return out


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl (everything) and metrics.csv (the per-epoch numbers, for spreadsheets)."""
    import csv
    import io

    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    columns = [k for k, v in history[0].items() if isinstance(v, int | float | bool)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def plot_curves(out: Path, history: list[dict]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_score.plot(epochs, [h["val_bleu4"] for h in history], label="BLEU-4")
    ax_score.plot(epochs, [h["val_cider"] for h in history], label="CIDEr-D")
    ax_score.set(xlabel="epoch", ylabel="score (0-100)", title="validation, greedy captions")
    ax_score.legend()
    fig.tight_layout()
    tmp = out / ".curves.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out / "curves.png")
