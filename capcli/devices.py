"""Where computation runs: the device a user asked for, checked, and the precision of its matrix products.

torch is imported inside the functions: the ONNX runtime path (`pip install capcli`, no torch) imports this
module too.
"""

from __future__ import annotations

from capcli.errors import CapcliError


def resolve_device(device: str) -> str:
    """"auto" (CUDA when present), "cpu" or "cuda[:N]", refused when CUDA is asked for and absent."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CapcliError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise CapcliError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


def matmul_dtype(precision: str, device: str):
    """The dtype of the training's matrix products: bfloat16 on CUDA and on CPUs with native bfloat16
    (AVX512-BF16 or AMX: about twice fp32's speed for this decoder), float32 elsewhere or when asked.

    Weights, optimiser state and the LSTM's cell state stay float32 (autocast), as on CUDA.
    """
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (oneDNN's own check)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
