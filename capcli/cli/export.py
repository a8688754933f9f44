"""`capcli export`: a run becomes an ONNX bundle."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.console import out


def export_cmd(
    run: Annotated[str, typer.Argument(help="Run directory or checkpoint file.")],
    out_dir: Annotated[str | None, typer.Option("--out", help="Bundle folder (default exported/RUN).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    images: Annotated[list[str] | None, typer.Option("--images", help="Images for the parity check.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
) -> None:
    """Export a run to an ONNX bundle (encoder + one-step decoder), checked against PyTorch."""
    import json
    from pathlib import Path

    from capcli.export import export

    bundle_dir = export(run, out_dir, opset, [Path(p) for p in images] if images else None, force)
    parity = json.loads((bundle_dir / "capcli.json").read_text())["parity"]
    out.print(
        f"bundle {bundle_dir}: parity encoder {parity['encoder_max_abs_diff']:.1e}, "
        f"step {parity['step_log_probs_max_abs_diff']:.1e}, greedy captions equal: {parity['greedy_captions_equal']}"
    )
