"""`capcli doctor`: the versions, providers and devices a bug report needs."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from capcli.console import out


def _torch_line(torch: dict | None) -> str:
    if torch is None:
        return "not installed (runtime-only install; pip install 'capcli[train]' adds it)"
    if "error" in torch:
        return f"{torch['version']} ({torch['error']})"
    devices = ", ".join(torch["devices"]) or "none usable"
    return f"{torch['version']} (CUDA build {torch['cuda_build'] or 'none'}); CUDA devices: {devices}"


def _onnxruntime_lines(ort: dict) -> list[tuple[str, str]]:
    packages = ", ".join(f"{d} {v}" for d, v in ort["distributions"].items()) or "not installed"
    lines = [("onnxruntime", packages)]
    if "error" in ort:
        return [*lines, ("", ort["error"])]
    cuda = ", ".join(ort["cuda_devices"]) if ort["cuda_usable"] else f"none ({ort['cuda_problem']})"
    lines += [("  providers", ", ".join(ort["providers"])), ("  CUDA devices", cuda)]
    if "cuda_libraries_problem" in ort:
        problem = ort["cuda_libraries_problem"]
        lines.append(("  CUDA libraries", f"missing: {problem}" if problem else "found"))
    if "problem" in ort:
        lines.append(("  problem", ort["problem"]))
    return lines


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show versions, ONNX Runtime providers, CUDA devices and backbone plugins (for bug reports)."""
    from capcli.environment import environment_report

    report = environment_report()
    if as_json:
        out.file.write(json.dumps(report, indent=2) + "\n")  # JSON escapes control characters itself
        return
    lines = [("capcli", report["capcli"]), ("python", f"{report['python']} on {report['platform']}"),
             ("torch", _torch_line(report["torch"])), *_onnxruntime_lines(report["onnxruntime"])]
    plugins = [f"{b['name']} ({b['distribution']} {b['version']}{', failed: ' + b['error'] if 'error' in b else ''})"
               for b in report["backbones"]]
    lines.append(("backbones", ", ".join(plugins) or "none installed"))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        out.print(f"{name:<{width}}  {value}", markup=False, highlight=False, soft_wrap=True)
