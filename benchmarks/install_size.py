"""Install sizes: the runtime (`pip install capcli`) beside the full install (capcli[train] and requirements.txt).

Walks the dependency closure of this checkout's pyproject.toml through the distributions installed in this
Python and adds up the files each one installed (its RECORD), so the figures are what a fresh venv with the same
versions holds in site-packages. --venv also builds a real runtime-only venv from a wheel of this checkout and
measures its site-packages (pip's cache makes the downloads fast after the first time).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
import venv
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
PLUGINS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def installed_bytes(name: str) -> int:
    dist = distribution(name)
    return sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().is_file())


def closure(requirements: list[str]) -> set[str]:
    """Names of the installed distributions these requirements pull in, transitively (markers evaluated)."""
    todo, seen, found = [Requirement(r) for r in requirements], set(), set()
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            print(f"  (not installed here, not counted: {req.name})", file=sys.stderr)
            continue
        found.add(canonicalize_name(req.name))
        for dep in map(Requirement, dist.requires or []):
            # a dependency counts when its marker holds without an extra or with one of the extras asked for
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {*req.extras, ""}):
                dep.marker = None
                todo.append(dep)
    return found


def project_requirements(extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def plugin_requirements() -> list[str]:
    reqs = []
    for folder in PLUGINS:
        project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        reqs += [r for r in project["dependencies"] if canonicalize_name(Requirement(r).name) != "capcli"]
    return reqs


def mb(names: set[str]) -> float:
    return sum(installed_bytes(n) for n in names) / 1e6


def venv_site_packages_mb() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp,
                        str(ROOT)], check=True)
        venv.create(Path(tmp) / "venv", with_pip=True)
        python = Path(tmp) / "venv" / "bin" / "python"
        subprocess.run([str(python), "-m", "pip", "install", "-q", *map(str, Path(tmp).glob("capcli-*.whl"))],
                       check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        du = subprocess.run(["du", "-sb", site], capture_output=True, text=True, check=True).stdout.split()[0]
        return int(du) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--venv", action="store_true", help="Also measure a real runtime-only venv.")
    args = ap.parse_args()
    runtime = closure(project_requirements([]))
    train = closure(project_requirements(["train"]))
    everything = closure(project_requirements(["train", "dev"]) + plugin_requirements())
    print("site-packages of each install, from the files the installed distributions recorded")
    for label, names in (("pip install capcli", runtime), ("pip install 'capcli[train]'", train),
                         ("requirements.txt (train, dev, plugins)", everything)):
        print(f"{label:40} {mb(names):7.0f} MB  {len(names):3d} distributions")
    print(f"runtime / capcli[train]: {mb(runtime) / mb(train):.1%}")
    largest = sorted(runtime, key=installed_bytes, reverse=True)[:5]
    print("largest in the runtime: " + ", ".join(f"{n} {installed_bytes(n) / 1e6:.0f}" for n in largest))
    if args.venv:
        print(f"a fresh runtime-only venv's site-packages (du): {venv_site_packages_mb():.0f} MB")


if __name__ == "__main__":
    main()
