"""The rich consoles the CLI writes to: results on stdout, progress and messages on stderr.

One rule for everything printed: user text (file names, captions, paths) is never markup or emoji.
Both consoles therefore read strings literally (markup and emoji off); styling is asked for
explicitly with `markup=True` on constant text or with `rich.text.Text` styles. Names that are not
valid UTF-8 (lone surrogates in Python) are shown with backslash escapes instead of crashing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

# C0 and C1 control characters: in a file name they could move the cursor, recolour or retitle the terminal,
# or forge a second line of output. \n, \r and \t keep their familiar escapes, the others read \xNN.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class SafeConsole(Console):
    """A console that shows the control characters of any plain string it prints as escapes, so that no line
    capcli prints, on a terminal or in a pipe, can carry a name's escape sequence or newline."""

    def print(self, *objects, **kwargs) -> None:  # type: ignore[override]
        super().print(*(shown(o) if isinstance(o, str) else o for o in objects), **kwargs)


out = SafeConsole(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = SafeConsole(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: _NAMED_CONTROLS.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def shown(value: object) -> str:
    """Any user text made printable on one line: bytes that were not UTF-8 appear as \\xNN, never as an encode
    error, and control characters as escapes."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            text = os.fsencode(text).decode("utf-8", errors="backslashreplace")
        except UnicodeEncodeError:  # a surrogate that did not come from a file name
            text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return escape_controls(text)


def plain(value: object, style: str = "") -> Text:
    """User text as a rich renderable that is never parsed as markup or emoji (for tables)."""
    return Text(shown(value), style=style)


def error(message: object) -> None:
    """One error line on stderr: 'error: ' in red, then the message as plain text."""
    err.print(Text.assemble(("error:", "red"), " ", shown(message)))


def warn(message: object) -> None:
    """One warning line on stderr."""
    err.print(Text.assemble(("warning:", "yellow"), " ", shown(message)))


def json_line(obj: Any) -> None:
    """One JSON line on stdout, bypassing rich: exact JSON of the values (ASCII escapes), always parseable.

    Paths that were not valid UTF-8 come out as \\udcXX escapes, which json.loads + os.fsencode turn
    back into the exact bytes given.
    """
    stream = out.file
    stream.write(json.dumps(obj, ensure_ascii=True) + "\n")
    stream.flush()


def tolerant_streams() -> None:
    """Make stdout/stderr print undecodable names as escapes instead of raising UnicodeEncodeError.

    The last line of defence for text that did not go through `shown` (say, a library's message).
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "strict") == "strict":
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or exotic stream: leave it as it is
                pass


def progress(transient: bool = False):
    """A rich progress bar on stderr with rate and ETA columns."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),  # descriptions may hold user text
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )
