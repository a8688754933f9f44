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
    quantize: Annotated[
        str | None, typer.Option(help="int8: quantize the graphs (encoder statically, decoder dynamically); "
                                      "float16: store the weights as float16 (half the size, float32 compute). "
                                      "Judged by captions on validation images against the float bundle.")
    ] = None,
    calibration: Annotated[
        int | None, typer.Option(help="Training images that calibrate the int8 encoder (default 300).")
    ] = None,
    min_agreement: Annotated[
        float | None, typer.Option(min=0, max=100, help="int8: % of validation captions that must equal the "
                                                        "float bundle's (default 90).")
    ] = None,
    max_cider_loss: Annotated[
        float | None, typer.Option(min=0, help="int8: largest CIDEr-D loss allowed, in % of the float bundle's "
                                               "(default 3).")
    ] = None,
) -> None:
    """Export a run to an ONNX bundle (encoder + one-step decoder), checked against PyTorch."""
    import json
    from pathlib import Path

    from capcli.bundle.build import export
    from capcli.bundle.judge import Tolerance
    from capcli.console import shown

    tolerance = None
    if min_agreement is not None or max_cider_loss is not None:
        default = Tolerance()
        tolerance = Tolerance(default.min_agreement if min_agreement is None else min_agreement,
                              default.max_cider_loss if max_cider_loss is None else max_cider_loss)
    bundle_dir = export(run, out_dir, opset, [Path(p) for p in images] if images else None, force, exporter,
                        quantize, calibration, tolerance)
    meta = json.loads((bundle_dir / "capcli.json").read_text())
    parity, exporters = meta["parity"], meta["exporter"]
    how = ", ".join(f"{graph} {exporters[graph]}" for graph in ("encoder", "decoder"))
    out.print(
        f"bundle {shown(bundle_dir)} ({how} exporter): parity encoder {parity['encoder_max_abs_diff']:.1e}, "
        f"step {parity['step_log_probs_max_abs_diff']:.1e}, greedy captions equal: {parity['greedy_captions_equal']}"
    )
    if "quantization" in meta:
        _print_quantization(meta["quantization"])


def _print_quantization(q: dict) -> None:
    p, tol = q["parity"], q["tolerance"]
    if q["mode"] == "float16":
        size = q["graph_bytes"]
        out.print(
            f"float16 weights: graphs {size['float16'] / 2**20:.1f} MiB vs {size['float32'] / 2**20:.1f} MiB; on "
            f"{p['images']} validation images (beam {p['beam_size']}) captions agree {p['agreement_percent']:.1f}% "
            f"(>= {tol['min_agreement']:g}%), CIDEr-D {p['scores']['float16']['CIDEr-D']:.1f} vs "
            f"{p['scores']['float32']['CIDEr-D']:.1f}"
        )
        return
    size, n = q["graph_bytes"], q["calibration_images"]
    corrected = q.get("encoder_bias_corrected_convs")
    out.print(
        f"int8 ({n} calibration image{'' if n == 1 else 's'}"
        f"{'' if corrected is None else f', {corrected} conv biases corrected'}): "
        f"graphs {size['int8'] / 2**20:.1f} MiB vs "
        f"{size['float32'] / 2**20:.1f} MiB float32 ({size['int8'] / size['float32']:.0%}); "
        f"on {p['images']} validation images (beam {p['beam_size']}) "
        f"captions agree {p['agreement_percent']:.1f}% (>= {tol['min_agreement']:g}%), CIDEr-D "
        f"{p['scores']['int8']['CIDEr-D']:.1f} vs {p['scores']['float32']['CIDEr-D']:.1f} "
        f"({0.0 - p['cider_loss_percent']:+.1f}%, tolerance -{tol['max_cider_loss']:g}%), BLEU-4 "
        f"{p['scores']['int8']['BLEU-4']:.1f} vs {p['scores']['float32']['BLEU-4']:.1f}"
    )
