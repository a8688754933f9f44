"""The README and the documentation site (issue 30): every `capcli` command line in them parses against the Typer
app, their Python blocks run as written, the README stays a landing page whose set-up commands are CI's, the CLI
reference documents every command and option, and the site builds with no warning and no request off the machine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from capcli.cli import app

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PHOTO = ROOT / "tests" / "images" / "chelsea.jpg"
SHIPPED = ROOT / "exported" / "flickr8k" / "capcli.json"


def _reference():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


def capcli_lines(path: Path) -> list[list[str]]:
    """The arguments of every capcli invocation in the page's bash blocks (after `capcli` or `-m capcli`)."""
    found = []
    for block in blocks(path, "bash"):
        for line in block.splitlines():
            for command in re.split(r"&&|\|\||;|\|", line.split(" #")[0]):
                words = shlex.split(command, comments=True)
                if words[:1] == ["capcli"]:
                    found.append(words[1:])
                elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["capcli"]:
                    found.append(words[words.index("-m") + 2 :])
    return found


def parse(args: list[str]) -> None:
    """Parse a command line as `capcli` would, without running it: UsageError for an unknown command or option,
    a missing argument or a bad value."""
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="capcli")
    path = ["capcli"]
    while hasattr(command, "list_commands"):
        assert args, f"{' '.join(path)} needs a command"
        sub = command.get_command(ctx, args[0])
        assert sub is not None and not sub.hidden, f"no command '{' '.join([*path, args[0]])}'"
        path.append(args[0])
        command, args = sub, args[1:]
        ctx = typer.Context(command, info_name=path[-1], parent=ctx)
    command.make_context(" ".join(path), list(args), parent=ctx.parent)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_capcli_command_line_parses(page):
    for args in capcli_lines(page):
        try:
            parse(args)
        except Exception as exc:  # typer's own copy of click raises its own exception types
            pytest.fail(f"{page.name}: capcli {shlex.join(args)}: {type(exc).__name__}: {exc}")


def test_the_checker_refuses_an_unknown_command_or_option():
    parse(["caption", "photo.jpg", "--beam-size", "5"])
    for bad in (["captions", "photo.jpg"], ["caption", "photo.jpg", "--beam-width", "5"], ["data"],
                ["caption", "photo.jpg", "--beam-size", "five"], ["export"]):
        with pytest.raises(Exception):  # noqa: B017 - each kind of mistake raises its own type
            parse(bad)


def test_readme_and_docs_name_capcli_commands():
    assert len(capcli_lines(ROOT / "README.md")) >= 8
    assert ["demo"] in capcli_lines(ROOT / "README.md")
    assert sum(len(capcli_lines(page)) for page in PAGES) >= 30


def test_readme_set_up_commands_are_the_ones_ci_runs():
    setup = blocks(ROOT / "README.md", "bash")[0]
    commands = [line.split("  #")[0].strip() for line in setup.splitlines() if line.strip()]
    assert commands == ["python3 -m pip install -r requirements.txt && capcli demo", "python3 -m pytest -q"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert all(command in ci for command in commands)


def test_ci_installs_the_docs_extra_and_builds_the_site_before_the_tests():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    install = lines.index("python3 -m pip install -e '.[docs]'")
    build = lines.index("mkdocs build --strict")
    assert install < build < lines.index("python3 -m pytest -q") == len(lines) - 1
    assert "mkdocs build --strict" in (ROOT / "README.md").read_text()


def test_readme_is_a_landing_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which is not in the checkout"
    assert readme.count("](docs/") >= 8
    assert len(re.findall(r"^\|(?:-+\|)+$", readme, re.M)) == 1, "one table of headline results"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped bundle is absent")
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.startswith("import capcli") for b in blocks(p, "python"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written(page, tmp_path):
    """Each block that starts with `import capcli` runs in a folder holding the photos it names."""
    for name in ("photo.jpg", "a.jpg", "b.jpg"):
        shutil.copy(PHOTO, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for block in blocks(page, "python"):
        if not block.startswith("import capcli"):
            continue
        proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=300)
        assert proc.returncode == 0, f"{page.name}:\n{block}\n{proc.stderr[-2000:]}"
        assert "a cat is" in proc.stdout  # the shipped model's caption of the cat (its classifier steers it to "cat")


def test_the_cli_reference_documents_every_command_and_option():
    reference = _reference()
    page = reference.render()
    root = typer.main.get_command(app)
    found = list(reference.commands(root, typer.Context(root, info_name="capcli")))
    paths = [path for path, _, _ in found]
    assert {"capcli caption", "capcli train", "capcli serve", "capcli data synth"} <= set(paths)
    assert "capcli env" not in paths  # hidden
    sections = re.split(r"^#{2,3} ", page, flags=re.M)
    for path, command, ctx in found:
        section = next((s for s in sections if s.startswith(f"`{path}`")), None)
        assert section is not None, f"no section for {path}"
        for param in command.get_params(ctx):
            if param.get_help_record(ctx) is None or "--help" in getattr(param, "opts", ()):
                continue
            names = (*param.opts, *param.secondary_opts) if param.param_type_name == "option" else (
                reference._argument_name(param),)
            for name in names:
                assert f"`{name}`" in section, f"{path}: {name} is not documented"


def test_the_cli_reference_is_not_in_the_checkout():
    """Generated at build time only: a copy in docs/ would go stale."""
    assert not (DOCS / "cli.md").exists()
    assert "cli.md" in (ROOT / "mkdocs.yml").read_text()


def test_help_text_is_escaped_for_markdown():
    reference = _reference()
    assert reference._text("<unk> a|b *x* `<code>`") == r"&lt;unk&gt; a\|b \*x\* `<code>`"
    assert reference._note("0<=x<=20") == "from 0 to 20" and reference._note("x>=1") == "at least 1"


def test_the_model_card_page_includes_the_shipped_card():
    assert '--8<-- "exported/flickr8k/MODEL_CARD.md"' in (DOCS / "model-card.md").read_text()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def test_the_site_builds_with_the_cli_reference_and_the_api(site):
    cli = (site / "cli" / "index.html").read_text()
    assert all(f'id="capcli-{name}"' in cli for name in ("caption", "train", "export", "serve", "data-synth"))
    api = (site / "api" / "index.html").read_text()
    for name in ("capcli.api.load", "capcli.api.Captioner", "capcli.api.Captioner.caption",
                 "capcli.runtime.captioner.CaptionResult"):
        assert f'id="{name}"' in api, name
    assert "what it gets wrong" in (site / "model-card" / "index.html").read_text().lower()


def test_the_site_needs_nothing_from_the_network(site):
    """No font service, no CDN: every stylesheet, script and image the pages load is part of the site."""
    for page in site.rglob("*.html"):
        html = page.read_text()
        loaded = re.findall(r"<(?:link|script|img)\b[^>]*?(?:href|src)=\"([^\"]+)\"", html)
        remote = [url for url in loaded if re.match(r"(https?:)?//", url)]
        assert not remote, f"{page.relative_to(site)} loads {remote}"
