"""`capcli backbones` and `capcli inspect BUNDLE`: what is installed, and what a bundle is."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from capcli.console import err, out


def backbones(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the installed backbone plugins."""
    from capcli.console import warn
    from capcli.registry import plugins, unmatched_names

    found = plugins()
    for name in unmatched_names():
        warn(f"CAPCLI_PLUGINS names '{name}', which no installed backbone plugin provides")
    rows = []
    for p in found:
        b = p.backbone
        rows.append(
            {
                "name": p.name,
                "feature_dim": b.feature_dim if b else None,
                "input_size": b.input_size if b else None,
                # [C, H, W] before pooling, for the attention decoder; null: pooled decoder only.
                "grid": [b.grid.channels, b.grid.height, b.grid.width] if b and b.has_grid else None,
                "weights": b.weights_source if b else None,
                "distribution": p.distribution,
                "version": p.version,
                **({"error": p.error} if p.error else {}),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title="capcli backbones")
    for col in ("name", "feature dim", "grid", "input", "weights", "distribution", "version"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["name"], Text("failed to load", "red"), "", "", r["error"], r["distribution"], r["version"])
        else:
            grid = "x".join(map(str, r["grid"])) if r["grid"] else "none (pooled only)"
            table.add_row(
                r["name"], str(r["feature_dim"]), grid, str(r["input_size"]), r["weights"],
                r["distribution"], r["version"],
            )
    if not rows:
        err.print("no backbone plugins installed (or CAPCLI_PLUGINS excludes them all)")
    out.print(table)


_MANIFEST_STATES = {
    "as exported": "as export wrote it",
    "edited": "capcli.json differs from what export wrote (edited since; it is used as it is, with a warning)",
    "not recorded": "no hash of its own (exported before capcli recorded one)",
}


def inspect(
    bundle: Annotated[str, typer.Argument(help="Bundle folder (made by capcli export).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show a bundle: its model, how it was trained, and whether its files and capcli.json are as export wrote
    them (exit 1 when not)."""
    from capcli.bundle.manifest import bundle_report

    report = bundle_report(bundle)
    if as_json:
        out.file.write(json.dumps(report, indent=2) + "\n")
    else:
        lines = [("bundle", report["bundle"]),
                 ("model", f"{report['backbone']}, {report['decoder']} decoder, {report['vocab_size']} words, "
                           f"captions of at most {report['max_len']} words"),
                 ("training", _training_line(report["training"])),
                 ("weights", f"{report['quantization']}-stored" if report["quantization"] else "float32"),
                 ("exported", f"{report['created'] or 'at an unknown time'} by capcli {report['capcli_version']}"),
                 ("files", ", ".join(f"{name} {state}" for name, state in report["files"].items())),
                 ("capcli.json", _MANIFEST_STATES[report["manifest"]])]
        width = max(len(name) for name, _ in lines)
        for name, value in lines:
            out.print(f"{name:<{width}}  {value}", markup=False, highlight=False, soft_wrap=True)
    if not report["intact"]:
        raise typer.Exit(1)


def _training_line(training: dict | None) -> str:
    if not training:
        return "not recorded (exported before capcli recorded it)"

    def stage(name: str, part: dict) -> str:
        val = part.get("val", {})
        scores = ", ".join(f"{label} {val[key]:g}" for key, label in (("cider", "CIDEr-D"), ("bleu4", "BLEU-4"),
                                                                     ("loss", "loss")) if key in val)
        return f"{name} epoch {part.get('epoch', '?')} of {part.get('epochs', '?')}" + (f" (val {scores})" if
                                                                                          scores else "")

    xe = stage("cross-entropy", training.get("cross_entropy", {}))
    if training["stage"] != "scst":
        return xe
    scst = training.get("scst", {})
    return f"{stage('scst', scst)}, {scst.get('baseline', '?')} baseline; from {xe}"
