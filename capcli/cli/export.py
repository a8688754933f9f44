"""`capcli export`: a run becomes an ONNX bundle."""

from __future__ import annotations

from typing import Annotated

import typer

from capcli.console import out


def export_cmd(
    run: Annotated[str, typer.Argument(help="Run directory or checkpoint file.")],
    out_dir: Annotated[str | None, typer.Option("--out", help="Bundle folder (default exported/RUN).")] = None,
    opset: Annotated[int, typer.Option(min=18, help="ONNX opset (18 or newer).")] = 18,
    images: Annotated[list[str] | None, typer.Option("--images", help="Images for the parity check.")] = None,
    exporter: Annotated[
        str, typer.Option(help="dynamo (torch.export, default) or torchscript (older; the fallback for graphs "
                               "dynamo cannot trace). Recorded in capcli.json.")
    ] = "dynamo",
    force: Annotated[
        bool, typer.Option(help="Replace an existing bundle's files (other files in the folder are kept).")
    ] = False,
) -> None:
    """Export a run to an ONNX bundle (encoder + one-step decoder), checked against PyTorch."""
    import json
    from pathlib import Path

    from capcli.console import shown
    from capcli.export import export

    bundle_dir = export(run, out_dir, opset, [Path(p) for p in images] if images else None, force, exporter)
    meta = json.loads((bundle_dir / "capcli.json").read_text())
    parity, exporters = meta["parity"], meta["exporter"]
    how = ", ".join(f"{graph} {exporters[graph]}" for graph in ("encoder", "decoder"))
    out.print(
        f"bundle {shown(bundle_dir)} ({how} exporter): parity encoder {parity['encoder_max_abs_diff']:.1e}, "
        f"step {parity['step_log_probs_max_abs_diff']:.1e}, greedy captions equal: {parity['greedy_captions_equal']}"
    )
