"""`capcli backbones`: what is installed."""

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
