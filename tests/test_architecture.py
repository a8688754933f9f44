"""The pipeline's shape, checked from the source: imports flow one way (data -> features -> model -> train ->
runtime -> export -> quantize -> caption/evaluate/serve/api -> cli), with no import circles and no module reaching
into another's private names; no file in capcli/ grows past what one reader holds in mind.

`python tests/test_architecture.py` prints the import graph, floor by floor (docs/architecture.md).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "capcli"

# Each module's stage, lowest first. A module may import its own stage's modules and those of lower stages.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("capcli", "errors", "console", "tables", "paths", "devices", "providers", "backbone", "registry",
              "images", "metrics", "decode", "guidance", "onnx_graphs", "testing")),
    ("data", ("data",)),
    ("features", ("features",)),
    ("model", ("model",)),
    ("train", ("train",)),
    ("runtime", ("bundle", "bundle.schema", "bundle.onnx_files", "bundle.manifest", "runtime")),
    ("export", ("bundle.export",)),
    ("quantize", ("bundle.bias_correction", "bundle.judge", "bundle.float16", "bundle.quantize", "bundle.build")),
    ("caption/evaluate/serve", ("heatmaps", "report", "evaluate", "serve", "api")),
    ("cli", ("demo", "environment", "cli", "__main__")),
]
MAX_LINES = 400
LONG_BY_NATURE = {"data/readers.py", "data/synthetic.py"}  # dataset readers and the generator read as one piece


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def public_face(tree: ast.Module) -> list[ast.stmt]:
    """The package's lazy public face in capcli/__init__.py: its `if TYPE_CHECKING:` imports and `__getattr__`,
    which import the Python API (capcli.api) only when one of its names is first used. They are not imports of
    the base stage (`import capcli` loads nothing), so the stage checks leave them out, and
    test_the_package_lazily_imports_only_the_python_api checks that they name capcli.api only."""
    return [node for node in tree.body
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")]


def imports(mods: dict[str, Path], skip_public_face: bool = True) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the capcli modules it imports (at module level or inside functions), and every import of a
    private (_name) from another module."""
    edges: dict[str, set[str]] = {}
    private = []

    def owner(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if mod == "capcli" and skip_public_face:
            tree.body = [node for node in tree.body if node not in public_face(tree)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "capcli"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.split(".")[0] != "capcli":
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in mods:
                        found.add(f"{base}.{alias.name}")
                        continue
                    found.add(owner(base))
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{mod} imports {alias.name} from {base}")
        found.discard(mod)
        edges[mod] = found
    return edges, private


def stage_of(mod: str) -> int:
    name = mod.removeprefix("capcli.") if mod != "capcli" else "capcli"
    best, floor = -1, None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    if floor is None:
        raise AssertionError(f"module {mod} has no stage in tests/test_architecture.py STAGES")
    return floor


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    edges, _ = imports(modules())
    assert circles(edges) == []


def test_no_module_imports_another_ones_private_names():
    _, private = imports(modules())
    assert private == []


def test_imports_flow_down_the_pipeline():
    edges, _ = imports(modules())
    upward = [f"{a} ({STAGES[stage_of(a)][0]}) imports {b} ({STAGES[stage_of(b)][0]})"
              for a, targets in sorted(edges.items()) for b in sorted(targets) if stage_of(b) > stage_of(a)]
    assert upward == []


def test_every_module_has_a_stage_and_a_docstring():
    for mod, path in modules().items():
        stage_of(mod)
        if path.name != "__main__.py":
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{mod} has no docstring"


def test_no_file_past_what_one_reader_holds():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert set(long) <= LONG_BY_NATURE, long


def test_the_package_lazily_imports_only_the_python_api():
    mods = modules()
    edges, _ = imports(mods, skip_public_face=False)
    lazy_edges, _ = imports(mods)
    assert edges["capcli"] - lazy_edges["capcli"] == {"capcli.api"}
    assert lazy_edges["capcli"] == set(), "capcli/__init__.py imports nothing of capcli when imported"


def test_the_checker_finds_a_circle_and_an_upward_import():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert stage_of("capcli.cli.app") > stage_of("capcli.bundle.build") > stage_of("capcli.bundle.export")
    assert stage_of("capcli.bundle.manifest") < stage_of("capcli.bundle.export")


def print_graph() -> None:
    edges, _ = imports(modules())
    for index, (name, _) in enumerate(STAGES):
        print(f"{name}:")
        for mod in sorted(m for m in edges if stage_of(m) == index):
            targets = ", ".join(sorted(t.removeprefix("capcli.") for t in edges[mod])) or "-"
            print(f"  {mod.removeprefix('capcli.') or 'capcli'} -> {targets}")


if __name__ == "__main__":
    print_graph()
