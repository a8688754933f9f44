"""`capcli export` as one step: a run's float bundle is written to a staging folder beside --out, quantized
there when asked (`capcli.bundle.quantize`), and moved into place file by file, the manifest last.

An --out that is an input of the export, a training run's folder or (without --force) another bundle is refused
before any work; an export that fails or is interrupted leaves --out as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from capcli.bundle import manifest
from capcli.bundle.export import DEFAULT_OPSET, check_opset, write_bundle
from capcli.bundle.quantize import check_request, quantize_bundle
from capcli.errors import CapcliError
from capcli.model import checkpoint
from capcli.onnx_graphs import check_exporter
from capcli.paths import (
    describe_os_error,
    is_bundle_folder,
    is_run_folder,
    output_folder,
    run_folder_holding,
    same_file_as_any,
    staging_folder,
)


def export(
    run: str | Path,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    images: list[Path] | None = None,
    force: bool = False,
    exporter: str = "dynamo",
    quantize: str | None = None,
    calibration: int | None = None,
    tolerance=None,
) -> Path:
    """Write the bundle for a run (its best checkpoint); returns the bundle folder.

    quantize='int8' (or 'float16'): once the float graphs pass parity, they are replaced by int8 ones,
    calibrated on `calibration` training images and refused beyond `tolerance` (a judge.Tolerance).
    """
    check_opset(opset)
    check_exporter(exporter)
    check_request(quantize, calibration, tolerance)
    ckpt_path = checkpoint.resolve(run)
    out = Path(out) if out is not None else Path("exported") / ckpt_path.resolve().parent.name
    prepare_out(out, force, [ckpt_path, *(images or [])])
    tmp = staging_folder(out.parent, out.name)  # beside `out`: renames stay atomic
    try:
        write_bundle(ckpt_path, tmp, opset, images, exporter)
        if quantize:
            quantize_bundle(tmp, quantize, calibration, tolerance)
        install(tmp, out)
    except OSError as exc:
        raise CapcliError(f"cannot write the bundle '{out}': {describe_os_error(exc)}; "
                          "nothing in it was changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


OUTPUT_FILES = ("encoder.onnx", "decoder.onnx", "vocab.json")  # and the manifest, written last


def prepare_out(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an --out that is a file, read-only, another folder's content or (without --force) a bundle.

    A training run's folder, or one where the bundle's files would replace the export's own inputs, is
    refused even with --force: the run's vocab.json and checkpoints are not export's to replace.
    """
    output_folder(out)
    if not out.exists():
        return
    if is_run_folder(out):
        raise CapcliError(f"--out '{out}' is a training run's folder; export the bundle outside it")
    run = run_folder_holding(out / manifest.MANIFEST)
    if run is not None and not is_bundle_folder(out):  # a run's own folder (scst/); an earlier bundle may be replaced
        raise CapcliError(f"--out '{out}' is a folder of the training run '{run}'; export the bundle outside it")
    for name in (*OUTPUT_FILES, manifest.MANIFEST):
        source = same_file_as_any(out / name, inputs)
        if source is not None:
            raise CapcliError(f"--out '{out}' would replace '{out / name}', an input of this export ({source})")
    if (out / manifest.MANIFEST).exists():
        if not force:
            raise CapcliError(f"bundle '{out}' already exists; use --force to replace it")
    elif any(out.iterdir()) and not force:
        raise CapcliError(f"'{out}' exists and is not a capcli bundle; choose another --out, or use --force "
                          "to write the bundle's files into it (other files are kept)")


def _files_of_previous_bundle(out: Path) -> dict[str, str]:
    """Name -> sha256 of what an earlier export wrote in `out`, read leniently (it may be old or broken)."""
    try:
        meta = json.loads((out / manifest.MANIFEST).read_text(encoding="utf-8"))
        hashes = meta.get("sha256", {}) if isinstance(meta, dict) else {}
        return {n: h for n, h in hashes.items() if isinstance(h, str) and manifest.plain_name_problem(n) is None}
    except (OSError, ValueError, AttributeError):
        return {}


def install(tmp: Path, out: Path) -> None:
    """Move the finished bundle into `out`, one atomic rename per file and the manifest last.

    Only export's own files are replaced: the user's other files in `out` (notes, evaluations) stay.
    Files an earlier export wrote that this one does not (and that nobody changed since) are removed.
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    previous = _files_of_previous_bundle(out)
    new = {p.name for p in tmp.iterdir()}
    for name in sorted(new - {manifest.MANIFEST}):
        os.replace(tmp / name, out / name)
    os.replace(tmp / manifest.MANIFEST, out / manifest.MANIFEST)
    for name, digest in previous.items():
        stale = out / name
        if name not in new and stale.is_file() and not stale.is_symlink() and manifest.sha256_file(stale) == digest:
            stale.unlink()
