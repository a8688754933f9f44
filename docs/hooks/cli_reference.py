"""The CLI reference page, generated from the Typer app when the site is built: never written by hand.

As an MkDocs hook (mkdocs.yml `hooks:`) it adds `cli.md` to the site's files; `render()` is the page's markdown,
every command and option that `capcli COMMAND --help` shows (hidden ones left out), in `capcli --help`'s order.
`python docs/hooks/cli_reference.py` prints it.
"""

from __future__ import annotations

import html
import re

import typer

PAGE = "cli.md"
# What `capcli --help` calls a value, as a reader of the reference would name it.
VALUE_NAMES = {"str": "TEXT", "int": "INTEGER", "int range": "INTEGER", "float": "FLOAT", "float range": "FLOAT",
               "path": "PATH", "list[str]": "TEXT", "bool": ""}


def _text(value: str) -> str:
    """Help text as markdown: code spans kept, everything else shown as written (no HTML, emphasis or tables)."""
    parts = re.split(r"(`[^`]*`)", value)
    return "".join(part if part.startswith("`") else re.sub(r"([\\*_|\[\]])", r"\\\1", html.escape(part, quote=False))
                   for part in parts)


def _paragraphs(help_text: str) -> str:
    blocks = [" ".join(block.split()) for block in re.split(r"\n\s*\n", help_text.replace("\b", "").strip())]
    return "\n\n".join(_text(block) for block in blocks if block)


def _value(param, record: str) -> str:
    if param.param_type_name == "argument":
        return ""
    shown = record
    for opt in (*param.opts, *param.secondary_opts):
        shown = shown.replace(opt, "")
    inner = shown.strip(" ,/").strip("<>")
    if not inner:
        return ""
    return VALUE_NAMES.get(inner, inner.upper())


def _argument_name(param) -> str:
    name = (param.metavar or param.name).upper()
    return f"{name}..." if param.nargs == -1 else name


def _extras(help_text: str) -> tuple[str, list[str]]:
    """click's help record ends with '  [default: 3; x>=1]' or '  [required]': (help, those pieces)."""
    match = re.search(r"(?:^|\s\s)\[([^\[\]]*)\]$", help_text)
    if not match:
        return help_text, []
    return help_text[: match.start()], [p.strip() for p in match.group(1).split(";")]


def _note(extra: str) -> str:
    """click's range notation ('0<=x<=20', 'x>=1') in words; other notes ('required') as they are."""
    words = {"<=": "at most", "<": "below", ">=": "at least", ">": "above"}
    if match := re.fullmatch(r"(\S+?)(<=|<)x(<=|<)(\S+)", extra):
        low, low_op, high_op, high = match.groups()
        if low_op == high_op == "<=":
            return f"from {low} to {high}"
        return f"{words['>=' if low_op == '<=' else '>']} {low}, {words[high_op]} {high}"
    if match := re.fullmatch(r"x(<=|<|>=|>)(\S+)", extra):
        return f"{words[match.group(1)]} {match.group(2)}"
    return extra


def _params_table(command, ctx) -> list[str]:
    rows = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or "--help" in getattr(param, "opts", ()):
            continue
        help_text, extras = _extras(record[1])
        default = next((e.removeprefix("default:").strip() for e in extras if e.startswith("default:")), "")
        notes = [_note(e) for e in extras if not e.startswith("default:")]
        if param.param_type_name == "argument":
            names = f"`{_argument_name(param)}`"
        else:
            names = " / ".join(f"`{o}`" for o in (*param.opts, *param.secondary_opts))
            value = _value(param, record[0])
            if value:
                names += f" *{value}*"
        described = _paragraphs(help_text).replace("\n\n", " ")
        if notes:
            described += " " + " ".join(f"*({_text(note)})*" for note in notes)
        rows.append(f"| {names} | {f'`{default}`' if default else ''} | {described} |")
    if not rows:
        return []
    arguments = any(p.param_type_name == "argument" for p in command.get_params(ctx))
    return [f"| {'argument or option' if arguments else 'option'} | default | what it does |", "|---|---|---|",
            *rows, ""]


def _usage(path: str, command, ctx) -> str:
    pieces = [path]
    params = [p for p in command.get_params(ctx) if p.get_help_record(ctx) is not None]
    if any(p.param_type_name == "option" for p in params):
        pieces.append("[OPTIONS]")
    for param in params:
        if param.param_type_name == "argument":
            name = _argument_name(param)
            pieces.append(name if param.required else f"[{name}]")
    if hasattr(command, "list_commands"):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def commands(group, ctx, prefix: str = "capcli"):
    """(command path, command, its context) for every command that --help lists, groups before their commands."""
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = typer.Context(command, info_name=name, parent=ctx)
        yield f"{prefix} {name}", command, sub
        if hasattr(command, "list_commands"):
            yield from commands(command, sub, f"{prefix} {name}")


def render() -> str:
    """The CLI reference as markdown."""
    from capcli.cli import app

    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="capcli")
    lines = [
        "# CLI reference",
        "",
        "Every `capcli` command and option, generated from the command line's own definitions when this site is "
        "built (`capcli COMMAND --help` prints the same). Commands are listed in pipeline order, as "
        "`capcli --help` lists them.",
        "",
        "```text",
        _usage("capcli", root, ctx),
        "```",
        "",
        *_params_table(root, ctx),
        "| command | what it does |",
        "|---|---|",
    ]
    found = list(commands(root, ctx))
    for path, command, _ in found:
        anchor = path.replace(" ", "-")
        lines.append(f"| [`{path}`](#{anchor}) | {_text(command.get_short_help_str(limit=200))} |")
    lines.append("")
    for path, command, sub in found:
        depth = "###" if path.count(" ") > 1 else "##"
        lines += [f"{depth} `{path}` {{#{path.replace(' ', '-')}}}", ""]
        if command.help:
            lines += [_paragraphs(command.help), ""]
        lines += ["```text", _usage(path, command, sub), "```", ""]
        lines += _params_table(command, sub)
    return "\n".join(lines).rstrip() + "\n"


def on_files(files, config):
    """MkDocs hook: add the generated page to the site."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    print(render(), end="")
