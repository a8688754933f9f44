"""The exported bundle's manifest: reading it, and refusing bundles that were altered.

Needs only the standard library: captioning from a bundle must not import torch.

Format version 2 adds the attention decoder: `decoder_kind` says "pooled" or "attention", and `io`
names the decoder's recurrent `state` inputs (fed from the encoder's h0/c0, then from the step's
own outputs) and its per-image `context` inputs (fed unchanged at every step from the encoder
outputs of the same names); an attention bundle also records its `grid` (height x width positions).
Version 1 bundles (pooled only, no such fields) still read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from capcli.errors import CapcliError

FORMAT = "capcli-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    if version not in READABLE_VERSIONS:
        raise CapcliError(
            f"bundle format version {version!r} is not supported (this capcli reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if verify:
        verify_files(folder, meta)
    return meta


def decoder_kind(meta: dict) -> str:
    """'pooled' or 'attention'; version 1 bundles are pooled."""
    return meta.get("decoder_kind", "pooled")


def state_inputs(meta: dict) -> list[str]:
    """The decoder's recurrent inputs, in the order the encoder outputs their initial values."""
    return list(meta.get("io", {}).get("state", ["h", "c"]))


def context_inputs(meta: dict) -> list[str]:
    """The decoder's per-image context inputs (none for a pooled decoder)."""
    return list(meta.get("io", {}).get("context", []))


def verify_files(folder: Path, meta: dict) -> None:
    for name, expected in meta.get("sha256", {}).items():
        path = folder / name
        if not path.is_file():
            raise CapcliError(f"bundle '{folder}' is incomplete: {name} is missing")
        if sha256_file(path) != expected:
            raise CapcliError(f"bundle '{folder}' was altered: sha256 of {name} does not match capcli.json")
