"""What a bug report needs to know about this install: versions, providers, CUDA devices, backbone plugins.

torch is optional here (a runtime-only install has none) and only imported when it is installed.
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

from capcli import __version__

# Distributions that all install the module `onnxruntime`: two of them installed overwrite each other.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


def _version_of(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def torch_info() -> dict | None:
    """torch's version and the CUDA devices it sees; None when torch is not installed."""
    if find_spec("torch") is None:
        return None
    try:
        import torch
    except Exception as exc:  # a broken install is worth reporting, not crashing on
        return {"version": _version_of("torch"), "error": f"import failed: {exc}"}
    available = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else []
    return {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": available,
            "devices": devices}


def onnxruntime_info() -> dict:
    """The installed ONNX Runtime distribution(s), its providers and whether it can use a CUDA device."""
    installed = {d: v for d in ORT_DISTRIBUTIONS if (v := _version_of(d))}
    info: dict = {"distributions": installed}
    if len(installed) > 1:
        info["problem"] = (f"{' and '.join(installed)} are both installed and overwrite each other's "
                           "`onnxruntime` module: uninstall all of them and install one")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        info["error"] = f"onnxruntime cannot be imported: {exc}"
        return info
    from capcli.providers import cuda_probe, ort_cuda_libraries_problem

    probe, providers = cuda_probe(), ort.get_available_providers()
    info |= {"version": ort.__version__, "device": ort.get_device(), "providers": providers,
             "cuda_usable": probe.usable, "cuda_devices": probe.devices, "cuda_problem": probe.problem}
    if "CUDAExecutionProvider" in providers:  # checked even without a GPU: a missing library is worth knowing
        info["cuda_libraries_problem"] = ort_cuda_libraries_problem()
    return info


def backbones_info() -> list[dict]:
    from capcli.registry import plugins

    return [{"name": p.name, "distribution": p.distribution, "version": p.version,
             **({"error": p.error} if p.error else {})} for p in plugins()]


def environment_report() -> dict:
    return {
        "capcli": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch_info(),
        "onnxruntime": onnxruntime_info(),
        "backbones": backbones_info(),
    }
