"""The exported bundle's manifest: reading it, and refusing bundles that were altered.

Needs only the standard library: captioning from a bundle must not import torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from capcli.errors import CapcliError

FORMAT = "capcli-bundle"
FORMAT_VERSION = 1
MANIFEST = "capcli.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest itself (graphs, external data, vocab)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The bundle's capcli.json, after checking its format version and every file's sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CapcliError(f"'{folder}' is not a capcli bundle (no {MANIFEST}); create one with capcli export")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CapcliError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    if meta.get("format") != FORMAT:
        raise CapcliError(f"{path}: not a capcli bundle manifest")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CapcliError(
            f"bundle format version {version!r} is not supported (this capcli reads version {FORMAT_VERSION})"
        )
    if verify:
        verify_files(folder, meta)
    return meta


def verify_files(folder: Path, meta: dict) -> None:
    for name, expected in meta.get("sha256", {}).items():
        path = folder / name
        if not path.is_file():
            raise CapcliError(f"bundle '{folder}' is incomplete: {name} is missing")
        if sha256_file(path) != expected:
            raise CapcliError(f"bundle '{folder}' was altered: sha256 of {name} does not match capcli.json")
