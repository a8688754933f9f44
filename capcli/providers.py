"""Which ONNX Runtime execution providers to use, and whether CUDA is really usable here.

onnxruntime-gpu lists `CUDAExecutionProvider` as available on any machine, GPU or not; asking for it where no
GPU or no CUDA library is found makes ONNX Runtime log errors and fall back to the CPU. So `auto` first probes
the NVIDIA driver (ctypes, no torch) and ONNX Runtime's CUDA libraries, and asks for CUDA only when both are
there. Needs onnxruntime only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import platform
from dataclasses import dataclass, field
from pathlib import Path

from capcli.errors import CapcliError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
ORT_ERRORS_ONLY = 3  # ONNX Runtime's log severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
CUDA_SUCCESS = 0


@dataclass(frozen=True)
class CudaProbe:
    """What the NVIDIA driver sees, and why CUDA cannot be used when it cannot."""

    devices: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None


def _driver_library() -> ctypes.CDLL:
    name = {"Windows": "nvcuda.dll", "Linux": "libcuda.so.1"}.get(platform.system())
    if name is None:
        raise OSError(f"CUDA is not available on {platform.system()}")
    return ctypes.CDLL(name)


def _device_names(driver: ctypes.CDLL) -> list[str]:
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != CUDA_SUCCESS:
        return []
    names = []
    for index in range(count.value):
        device, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
        driver.cuDeviceGet(ctypes.byref(device), index)
        driver.cuDeviceGetName(name, len(name), device)
        names.append(name.value.decode(errors="replace"))
    return names


@functools.cache
def driver_probe() -> CudaProbe:
    """CUDA devices seen by the NVIDIA driver (honours CUDA_VISIBLE_DEVICES)."""
    try:
        driver = _driver_library()
    except OSError:
        return CudaProbe(problem="no NVIDIA driver found (libcuda cannot be loaded)")
    status = driver.cuInit(0)
    if status != CUDA_SUCCESS:
        return CudaProbe(problem=f"the NVIDIA driver sees no usable GPU (cuInit error {status})")
    names = _device_names(driver)
    return CudaProbe(devices=names, problem=None if names else "the NVIDIA driver sees no CUDA device")


def _cuda_provider_library(ort) -> Path:
    capi = Path(ort.__file__).parent / "capi"
    return capi / ("onnxruntime_providers_cuda.dll" if platform.system() == "Windows"
                   else "libonnxruntime_providers_cuda.so")


@functools.cache
def ort_cuda_libraries_problem() -> str | None:
    """Why ONNX Runtime's CUDA provider library cannot load (a missing CUDA/cuDNN library), or None."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        # Loads the CUDA and cuDNN libraries that pip installed (torch's, or onnxruntime-gpu[cuda,cudnn]'s) so
        # the provider finds them without importing torch; it prints its failures, which we report ourselves.
        with contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls()
    library = _cuda_provider_library(ort)
    if not library.is_file():
        return f"{library.name} is missing from this onnxruntime"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return (str(exc).splitlines() or [type(exc).__name__])[0].removeprefix(f"{library}: ")
    return None


def cuda_probe() -> CudaProbe:
    """Whether ONNX Runtime can run on a CUDA device here: provider, driver, device and libraries."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return CudaProbe(problem="this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    driver = driver_probe()
    if not driver.usable:
        return driver
    missing = ort_cuda_libraries_problem()
    if missing:
        return CudaProbe(devices=driver.devices, problem=f"ONNX Runtime's CUDA libraries do not load ({missing}); "
                         "pip install 'capcli[cuda]' adds CUDA 13 and cuDNN 9")
    return CudaProbe(devices=driver.devices)


def quiet_onnxruntime() -> None:
    """Keep ONNX Runtime's warnings (node placement, fallbacks we handle ourselves) off the terminal."""
    import onnxruntime as ort

    ort.set_default_logger_severity(ORT_ERRORS_ONLY)


def choose_providers(provider: str) -> list[str]:
    """Execution providers for `auto`, `cpu` or `cuda`; `cuda` that cannot run is one clear error."""
    import onnxruntime as ort

    if provider not in (*PROVIDERS, "auto"):
        raise CapcliError(f"unknown provider '{provider}'; use auto, cpu or cuda")
    quiet_onnxruntime()
    if provider == "cpu":
        return PROVIDERS["cpu"]
    available = ort.get_available_providers()
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise CapcliError(
            "--provider cuda asked for, but this onnxruntime has no CUDA provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime"
        )
    probe = cuda_probe()
    if probe.usable:
        return PROVIDERS["cuda"]
    if provider == "cuda":
        raise CapcliError(f"--provider cuda asked for, but CUDA cannot be used here: {probe.problem} "
                          "(capcli doctor shows what was found; --provider cpu runs without it)")
    return PROVIDERS["cpu"]
