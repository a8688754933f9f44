"""Rich tables of pipeline results, shared by the front ends (CLI, demo)."""

from __future__ import annotations

import json

from capcli.console import err, out


def print_training(run_dir) -> None:
    from rich.table import Table

    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = run_dir / "config.json"
    train = json.loads(config.read_text()).get("train", {}) if config.is_file() else {}
    how = [f"photos framed by {train['resize_mode']}"] if train.get("resize_mode") else []
    how += [f"tail from {train['split']} fine-tuned"] if train.get("finetune") else []
    how += ["flipped photos"] if train.get("flip") else []
    table = Table(title=f"training {run_dir}" + (f" ({', '.join(how)})" if how else ""))
    for col in ("epoch", "train loss", "val loss", "val BLEU-4", "val CIDEr-D", "tokens/s", "lr", ""):
        table.add_column(col, justify="right")
    for h in history:
        table.add_row(str(h["epoch"]), f"{h['train_loss']:.3f}", f"{h['val_loss']:.3f}", f"{h['val_bleu4']:.1f}",
                      f"{h['val_cider']:.1f}", f"{h['tokens_per_s']:,.0f}", f"{h['lr']:.1e}",
                      "best" if h.get("best") else "")
    out.print(table)
    improved = [h for h in history if h.get("best")]  # the last improvement is what best.pt holds
    best = improved[-1] if improved else min(history, key=lambda h: h["val_loss"])
    best_pt = run_dir / "best.pt"
    if best_pt.is_file():  # a run stopped early may have none
        out.print(f"best epoch {best['epoch']} (val CIDEr-D {best['val_cider']:.1f}, val loss {best['val_loss']:.3f}): "
                  f"its weights are {best_pt}")


def print_scores(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{report['dataset']} {report['split']} · {report['images']} images · "
                        f"beam {report['beam_size']} · {report['runtime']} · tokenizer {report['tokenizer']}")
    table.add_column("metric")
    table.add_column("score (0-100)", justify="right")
    for name, value in report["scores"].items():
        table.add_row(name, f"{value:.1f}")
    truth = report.get("colour_shape_correct")
    if truth is not None:
        table.add_row("main object colour+shape right %", f"{truth['main_object']:.1f}")
        table.add_row("every named object right %", f"{truth['all_named']:.1f}")
    out.print(table)
    for s in report.get("skipped", []):
        err.print(f"skipped: {s}")
    out.print(f"captions and scores written to {report['out']}")
