"""Choosing ONNX Runtime's providers: CUDA only where it really runs, one clear error for an impossible cuda."""

import json

import pytest
from typer.testing import CliRunner

from capcli import providers
from capcli.cli import app
from capcli.errors import CapcliError
from capcli.runtime.captioner import open_captioner

CPU, CUDA = providers.PROVIDERS["cpu"], providers.PROVIDERS["cuda"]


@pytest.fixture
def gpu_machine(monkeypatch):
    """Pretend the driver sees a GPU and ONNX Runtime's CUDA libraries load; tests set what is missing."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *CPU])
    monkeypatch.setattr(providers, "driver_probe", lambda: providers.CudaProbe(devices=["Some GPU"]))
    monkeypatch.setattr(providers, "ort_cuda_libraries_problem", lambda: None)
    return monkeypatch


def test_auto_and_cuda_use_cuda_where_it_is_usable(gpu_machine):
    assert providers.choose_providers("auto") == CUDA
    assert providers.choose_providers("cuda") == CUDA
    assert providers.choose_providers("cpu") == CPU


def test_a_listed_cuda_provider_without_a_gpu_is_not_used_by_auto(gpu_machine):
    gpu_machine.setattr(providers, "driver_probe", lambda: providers.CudaProbe(problem="no NVIDIA driver found"))
    assert providers.choose_providers("auto") == CPU
    with pytest.raises(CapcliError, match="--provider cuda asked for, but CUDA cannot be used here: no NVIDIA"):
        providers.choose_providers("cuda")


def test_missing_cuda_libraries_mean_cpu_for_auto_and_an_error_naming_them_for_cuda(gpu_machine):
    gpu_machine.setattr(providers, "ort_cuda_libraries_problem", lambda: "libcurand.so.10: cannot open")
    assert providers.choose_providers("auto") == CPU
    with pytest.raises(CapcliError, match=r"libcurand\.so\.10.*capcli\[cuda\]"):
        providers.choose_providers("cuda")


def test_cpu_only_onnxruntime(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: CPU)
    assert providers.choose_providers("auto") == CPU
    with pytest.raises(CapcliError, match="no CUDA provider"):
        providers.choose_providers("cuda")
    with pytest.raises(CapcliError, match="unknown provider 'tpu'"):
        providers.choose_providers("tpu")


def test_driver_probe_agrees_with_torch():
    torch = pytest.importorskip("torch")
    assert providers.driver_probe().usable == (torch.cuda.device_count() > 0)


def test_auto_on_this_machine_opens_the_bundle_without_onnxruntime_messages(exported_tiny, capfd):
    probe = providers.cuda_probe()
    captioner = open_captioner(exported_tiny, "onnx", provider="auto")
    captured = capfd.readouterr()
    assert captioner.providers[0] == ("CUDAExecutionProvider" if probe.usable else "CPUExecutionProvider")
    assert "onnxruntime" not in captured.err + captured.out, captured.err[-2000:]


def test_cuda_without_a_usable_gpu_is_one_error_line(exported_tiny, tmp_path):
    if providers.cuda_probe().usable:
        pytest.skip("a CUDA device is usable here: --provider cuda works")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(image)
    result = CliRunner().invoke(app, ["caption", str(image), "--model", str(exported_tiny), "--provider", "cuda"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --provider cuda asked for"), result.stderr


def test_doctor_reports_versions_providers_and_plugins():
    import onnxruntime

    from capcli.registry import plugins

    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    from capcli import __version__

    assert report["capcli"] == __version__
    assert report["onnxruntime"]["version"] == onnxruntime.__version__
    assert report["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert report["onnxruntime"]["cuda_usable"] == providers.cuda_probe().usable
    assert [b["name"] for b in report["backbones"]] == [p.name for p in plugins()]
    text = CliRunner().invoke(app, ["doctor"])
    assert text.exit_code == 0 and "onnxruntime" in text.stdout and "CUDA devices" in text.stdout
