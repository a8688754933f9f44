"""Installs that hold anywhere (issue 19 item 7): declared test dependencies, CI from a fresh virtual environment,
and an evaluation that writes nothing inside site-packages and prints no library line."""

from __future__ import annotations

import ast
import os
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from capcli.metrics import java_available, score_captions

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> set[str]:
    """Every distribution pyproject.toml (all extras) or a bundled plugin's pyproject.toml names."""
    names = set()
    for pyproject in [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]:
        project = tomllib.loads(pyproject.read_text())["project"]
        requirements = [*project.get("dependencies", []),
                        *(r for extra in project.get("optional-dependencies", {}).values() for r in extra)]
        names |= {canonicalize_name(Requirement(r).name) for r in requirements}
        names.add(canonicalize_name(project["name"]))
    return names


def _imported_by_tests() -> set[str]:
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found


def test_every_module_the_tests_import_is_declared():
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")}
    providers = packages_distributions()
    declared = _declared()
    undeclared = {}
    for module in sorted(_imported_by_tests() - local - set(sys.stdlib_module_names) - {"capcli"}):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & declared:
            undeclared[module] = sorted(dists) or ["(not installed)"]
    assert not undeclared, f"imported by the tests but declared nowhere in pyproject.toml: {undeclared}"


def test_ci_installs_into_a_fresh_virtual_environment():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    venv = next(i for i, line in enumerate(commands) if re.search(r"python3? -m venv (\S*/)?\.venv\b", line))
    install = next(i for i, line in enumerate(commands) if "pip install -r requirements.txt" in line)
    tests = next(i for i, line in enumerate(commands) if "-m pytest" in line)
    on_path = next(i for i, line in enumerate(commands) if re.search(r"PATH=\S*\.venv/bin:", line))
    assert venv < on_path < install < tests, "the venv is created and first on PATH before the README's commands"
    assert "--system-site-packages" not in script, "the machine's own packages must not make up for a missing one"
    assert "capcli demo" in script and commands[-1].endswith("-m pytest -q")


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer needs java")
def test_ptb_tokenizer_writes_nothing_in_site_packages_and_prints_nothing(capfd):
    from pycocoevalcap.tokenizer import ptbtokenizer

    package = os.path.realpath(Path(ptbtokenizer.__file__).parent.parent)  # a namespace package: no __file__
    written: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and os.path.realpath(os.fsdecode(args[0])).startswith(package):
                written.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: `watching` switches this one off
    try:
        scores = score_captions({"a": ["a red circle.", "A red ring!"]}, {"a": "a red circle"}, meteor=False,
                                tokenizer="ptb")
    finally:
        watching[0] = False
    assert scores.tokenizer == "ptb" and scores.values["BLEU-1"] > 0
    assert not written, f"written inside the installed pycocoevalcap: {written}"
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
