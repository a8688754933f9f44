"""Runs the documentation's bundle snippet (docs/bundles.md, "Captioning without capcli") as a user would: a script
with onnxruntime, numpy and Pillow only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PHOTOS = sorted((ROOT / "tests" / "images").glob("*.jpg"))  # real photos: odd sizes, so the crop's rounding shows


def snippet() -> str:
    page = (ROOT / "docs" / "bundles.md").read_text()
    return re.search(r"```python\n(# bundle-snippet.*?)```", page, re.S).group(1)


def snippet_captions(bundle: Path, images: list[Path], tmp_path: Path) -> list[str]:
    """The snippet's greedy caption of each image, run in a fresh interpreter where torch and capcli cannot load."""
    script = tmp_path / "snippet.py"
    script.write_text(snippet())
    guard = "import sys; sys.modules['torch'] = None; sys.modules['capcli'] = None\n"  # neither may be used
    captions = []
    for image in images:
        runner = tmp_path / "run.py"
        runner.write_text(guard + f"sys.argv = ['snippet', {str(bundle)!r}, {str(image)!r}]\n"
                          f"exec(open({str(script)!r}).read())\n")
        proc = subprocess.run([sys.executable, str(runner)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        captions.append(proc.stdout.strip())
    return captions
