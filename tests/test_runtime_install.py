"""The runtime install: `pip install capcli` without torch captions, evaluates and serves a bundle; training
commands there end with one line naming capcli[train]."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest
from serve_helpers import PHOTOS, running_server

from capcli.runtime.captioner import caption_images, open_captioner

ROOT = Path(__file__).parents[1]
TRAINING_COMMANDS = {
    "train": ["train", "--backbone", "efficientnet_lite0"],
    "features": ["features", "--backbone", "efficientnet_lite0"],
    "export": ["export", "RUN"],
    "demo": ["demo"],
    "caption --runtime torch": ["caption", "IMAGE", "--model", "RUN", "--runtime", "torch"],
    "data download": ["data", "download", "flickr8k"],
}
ONLY_IN_TRAIN = ("torch", "torchvision", "onnx", "onnxscript", "matplotlib", "kagglehub")
HINT = "pip install 'capcli[train]'"


def _commands(run: Path, image: Path) -> dict[str, list[str]]:
    fill = {"RUN": str(run), "IMAGE": str(image)}
    return {name: [fill.get(a, a) for a in args] for name, args in TRAINING_COMMANDS.items()}


def _assert_one_line_hint(proc: subprocess.CompletedProcess, name: str) -> None:
    """Exit 1, and stderr ends with the one error line, naming capcli[train] (after any progress line)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], (name, lines)
    assert HINT in lines[-1], (name, lines)


@pytest.mark.parametrize("name", list(TRAINING_COMMANDS))
def test_training_commands_without_torch_end_with_one_line(name, tiny_run, tmp_path):
    """The training stack hidden from the interpreter: the CLI group turns the missing import into the hint."""
    args = _commands(tiny_run, PHOTOS[0])[name]
    code = (f"import sys; sys.modules.update(dict.fromkeys({ONLY_IN_TRAIN!r}))\n"
            f"sys.argv = ['capcli', *{args!r}]\nfrom capcli.cli import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    _assert_one_line_hint(proc, name)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv holding only `pip install <wheel of this checkout>` (dependencies from the package index)."""
    folder = tmp_path_factory.mktemp("runtime-install")
    wheels = folder / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    env_dir = folder / "venv"
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", *map(str, wheels.glob("capcli-*.whl"))],
                             capture_output=True, text=True, timeout=1800, env=_clean_env())
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir


def _clean_env() -> dict[str, str]:
    """This process's environment without the paths that point at the checkout or its plugins."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(env_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_dir / "bin" / "capcli"), *args], capture_output=True, text=True, timeout=600,
                          env=_clean_env(), cwd=cwd)


@pytest.mark.slow
def test_runtime_install_has_no_torch_and_captions_evaluates_and_serves(
        runtime_venv, exported_tiny, tiny_run, small_synthetic, tmp_path):
    python = runtime_venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, capcli; print(capcli.__file__); "
                            "print([m for m in ('torch', 'torchvision', 'onnx') if u.find_spec(m)])"],
                           capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    where, found = probe.stdout.splitlines()
    assert where.startswith(str(runtime_venv)) and found == "[]", probe.stdout + probe.stderr

    caption = _run(runtime_venv, "caption", str(PHOTOS[0]), "--model", str(exported_tiny), "--json")
    assert caption.returncode == 0, caption.stderr
    want = caption_images(open_captioner(exported_tiny, "onnx", provider="cpu"), [PHOTOS[0]], beam_size=3)[0]
    assert json.loads(caption.stdout.splitlines()[0])["caption"] == want.caption
    assert "onnxruntime" not in caption.stderr  # no provider error spam

    evaluated = _run(runtime_venv, "evaluate", str(exported_tiny), "--dataset", str(small_synthetic), "--limit", "4",
                     "--json", "--out", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["images"] == 4

    for args in (["--help"], ["backbones"]):
        listed = _run(runtime_venv, *args)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, (args, listed.stderr)

    doctor = _run(runtime_venv, "doctor", "--json")
    assert doctor.returncode == 0 and json.loads(doctor.stdout)["torch"] is None, doctor.stderr

    with running_server(exported_tiny, python=str(python), pythonpath=False) as (url, _proc):
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        assert "/static/app.js" in httpx.get(url).text and httpx.get(f"{url}/static/app.js").status_code == 200
        photo = PHOTOS[0]
        answer = httpx.post(f"{url}/v1/captions", files={"images": (photo.name, photo.read_bytes(), "image/jpeg")},
                            timeout=120)
        assert answer.status_code == 200 and answer.json()["results"][0]["caption"] == want.caption

    for name, args in _commands(tiny_run, PHOTOS[0]).items():
        _assert_one_line_hint(_run(runtime_venv, *args, cwd=tmp_path), name)
