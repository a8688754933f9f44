"""Where capcli keeps its caches, where user paths become output files, and atomic file writes.

Every file capcli writes goes through `atomic_write_bytes` (temp file beside, fsync, rename) and every
path a user names for output is checked here first, so both rules live in one place: outputs get the
permissions the user's umask asks for, and an unusable output path is one clear error before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capcli.errors import CapcliError


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask (mkstemp would give 0o600)."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode mkdir() would give a new folder: 0o777 less the umask (mkdtemp would give 0o700)."""
    return 0o777 & ~current_umask()


def describe_os_error(exc: OSError) -> str:
    """An OSError as one readable phrase: 'No space left on device', 'Read-only file system', ..."""
    return exc.strerror or str(exc) or type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_can_create(path: Path, what: str) -> None:
    """`path` does not exist yet: its nearest existing ancestor must be a folder we may write in."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise CapcliError(f"{what} '{path}' cannot be created: '{ancestor}' is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CapcliError(f"{what} '{path}' cannot be created: folder '{ancestor}' is not writable")


def check_no_climb_out_of_missing(path: Path, what: str) -> None:
    """Refuse a `..` that steps out of a folder not there yet (DIR/missing/../NAME).

    The checks on an output path see what the path names now; such a path names nothing now, but once the
    command creates `missing` it names DIR/NAME, which may be an input or a file of a bundle or a run.
    """
    parts = path.parts
    for index, part in enumerate(parts[1:], start=1):
        if part == ".." and not Path(*parts[:index]).is_dir():
            raise CapcliError(f"{what} '{path}': '..' steps out of '{Path(*parts[:index])}', which is not an "
                              "existing folder; name the path without it")


def output_file(path: str | Path, what: str = "--out") -> Path:
    """A user-named path that will become a file: checked before any work, so a bad one costs nothing.

    It must not be a folder, and the folder it goes in must exist as a writable folder or be creatable.
    """
    if not str(path).strip():
        raise CapcliError(f"{what}: empty path")
    path = Path(path)
    check_no_climb_out_of_missing(path, what)
    if path.is_dir():
        raise CapcliError(f"{what} '{path}' is a folder; name a file")
    if path.exists() or path.is_symlink():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise CapcliError(f"{what} '{path}' cannot be replaced: folder '{path.parent}' is not writable")
        return path
    _check_can_create(path, what)
    return path


BUNDLE_MANIFEST = "capcli.json"  # capcli.bundle.manifest.MANIFEST; bundle imports this module, not the other way round
RUN_FILES = ("best.pt", "last.pt", "vocab.json")  # beside config.json, what makes a folder a training run


def is_bundle_folder(folder: str | Path) -> bool:
    return os.path.lexists(Path(folder) / BUNDLE_MANIFEST)


def is_run_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and any((folder / name).exists() for name in RUN_FILES)


def run_folder_holding(path: str | Path) -> Path | None:
    """The training run whose folder holds `path`, directly or in a folder of its own (run/scst/last.pt)."""
    folder = Path(os.path.realpath(Path(path).parent))  # the folder the name is in, through any link to it
    return next((f for f in (folder, folder.parent) if is_run_folder(f)), None)


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_file_as_any(path: str | Path, inputs) -> str | None:
    """The first of `inputs` that is the file at `path` (the same file by any name, link or hard link)."""
    target = _identity(path)
    if target is None:
        return None
    return next((str(p) for p in inputs if _identity(p) == target), None)


def protected_output(
    path: str | Path,
    what: str,
    *,
    inputs=(),
    force: bool = False,
    ours: Callable[[Path], bool] | None = None,
) -> Path:
    """`output_file`, and a file capcli may replace.

    Never one of the command's `inputs` nor a file of a bundle, and of a training run (in its folder or one of
    its own, like scst/) only a report capcli wrote there (`ours`), not even with --force: they are what the
    command reads or what other commands need. Another existing file only when `ours(path)` says capcli wrote
    it, or with `force`.
    """
    path = output_file(path, what)
    source = same_file_as_any(path, inputs)
    if source is not None:
        raise CapcliError(f"{what} '{path}' is an input of this command ({source}); choose another path")
    if not (path.exists() or path.is_symlink()):
        return path
    if is_bundle_folder(path.parent):
        raise CapcliError(f"{what} '{path}' is a file of the bundle '{path.parent}'; choose a path outside it")
    if ours is not None and path.is_file() and not path.is_symlink() and _safely(ours, path):
        return path
    run = run_folder_holding(path)
    if run is not None:
        raise CapcliError(f"{what} '{path}' is a file of the training run '{run}'; choose a path outside it")
    if not force:
        raise CapcliError(f"{what} '{path}' exists and was not written by capcli; choose another path, or "
                          "use --force to replace it")
    return path


def _safely(test: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(test(path))
    except (OSError, ValueError):
        return False


def starts_with(path: Path, *markers: bytes, within: int = 4096) -> bool:
    """Whether the first `within` bytes of the file hold every marker: how capcli recognises its own reports."""
    with open(path, "rb") as f:
        head = f.read(within)
    return all(marker in head for marker in markers)


def output_folder(path: str | Path, what: str = "--out") -> Path:
    """A user-named path that will become (or is) a folder capcli writes files in."""
    if not str(path).strip():
        raise CapcliError(f"{what}: empty path")
    path = Path(path)
    check_no_climb_out_of_missing(path, what)
    if path.exists():
        if not path.is_dir():
            raise CapcliError(f"{what} '{path}' is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CapcliError(f"{what} folder '{path}' is not writable")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise CapcliError(f"{what} '{path}' cannot be replaced: folder '{path.parent}' is not writable")
        return path
    _check_can_create(path, what)
    return path


def make_folder(path: str | Path, what: str = "folder") -> Path:
    """mkdir -p with one clear line when it cannot be done (a file in the way, read-only, disk full)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CapcliError(f"{what} '{path}' is a file, not a folder") from None
    except OSError as exc:
        raise CapcliError(f"cannot create {what} '{path}': {describe_os_error(exc)}") from None
    return path


def make_temp_folder(parent: str | Path, prefix: str, suffix: str = ".tmp") -> Path:
    """A fresh folder in `parent` that may later become a user's folder: it gets the umask's permissions."""
    parent = make_folder(parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
        os.chmod(tmp, folder_mode())
    except OSError as exc:
        raise CapcliError(f"cannot create a folder in '{parent}': {describe_os_error(exc)}") from None
    return tmp


def staging_folder(parent: str | Path, name: str) -> Path:
    """A hidden staging folder `.NAME.PID.*.tmp` beside where `name` will be installed, after removing the
    ones that processes no longer running left behind (killed mid-way, they could not clean up)."""
    parent = Path(parent)
    remove_stale_staging(parent, name)
    return make_temp_folder(parent, prefix=f".{name}.{os.getpid()}.")


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove `.NAME.*.tmp` folders in `parent` whose process has ended; those of a running one are kept."""
    removed = []
    try:
        candidates = list(parent.glob(f".{glob_escape(name)}.*.tmp"))
    except OSError:
        return removed
    for folder in candidates:
        pid = folder.name[len(name) + 2:].split(".", 1)[0]
        if folder.is_dir() and not folder.is_symlink() and not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a number no process can have: leave it alone
    return True


def cache_root() -> Path:
    """The cache folder: $CAPCLI_CACHE, else ~/.cache/capcli."""
    root = os.environ.get("CAPCLI_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "capcli"
    return make_folder(path, "cache folder (CAPCLI_CACHE)" if root else "cache folder")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    The file gets the permissions a plain open() would give (umask honoured); a failure (disk full,
    read-only folder) is one CapcliError and leaves any earlier file at `path` untouched.
    """
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CapcliError(f"cannot write '{path}': {describe_os_error(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CapcliError(f"cannot write '{path}': {describe_os_error(exc)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    # Names that are not valid UTF-8 arrive as lone surrogates; written as \udcXX rather than crashing.
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
