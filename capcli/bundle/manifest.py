"""The exported bundle's manifest: its schema, reading it, and refusing bundles that were altered or mixed up.

`read_manifest` is the one door into a bundle: the manifest is checked against the schema below (one
clear error naming the first bad key), every file it names must be a plain name inside the folder and
match its sha256, and `load_vocabulary` ties vocab.json to the manifest. The runtimes then check the
graphs' shapes against the same manifest (capcli.runtime.onnx_runtime).

Needs only the standard library: captioning from a bundle must not import torch.

Format version 3 adds the attention decoder: `decoder_kind` says "pooled" or "attention", and `io`
names the decoder's recurrent `state` inputs (fed from the encoder's h0/c0, then from the step's
own outputs) and its per-image `context` inputs (fed unchanged at every step from the encoder
outputs of the same names); an attention bundle also records its `grid` (height x width positions,
row-major). Version 2 bundles (pooled, without those fields) still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from capcli.bundle.onnx_files import external_data_files
from capcli.bundle.schema import (
    FORMAT,
    GRAPH_FILES,
    MANIFEST,
    MANIFEST_DIGEST_KEY,
    MAX_MANIFEST_BYTES,
    READABLE_VERSIONS,
    SPECIAL_TOKENS,
    ManifestError,
    plain_name_problem,
    validate_manifest,
)
from capcli.errors import CapcliError
from capcli.paths import describe_os_error


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest itself (graphs, external data, vocab)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


# --- the manifest's own hash ------------------------------------------------------------------------------
#
# What a bundle's integrity covers: every file but capcli.json is hashed in capcli.json (`sha256`) and refused
# when it differs; the graphs carry the vocabulary's and the source checkpoint's hashes, checked against
# capcli.json. capcli.json itself is checked against its schema (what breaks it is refused) and carries
# `manifest_sha256`, the sha256 of its content without that key as export (or quantize) wrote it: an edit within
# the schema is the user's to make (a note, a model card), so it is used, with a warning, and `capcli inspect`
# names it. The hash guards against accidents, not against someone who means to deceive: anyone can recompute it.


def manifest_digest(meta: dict) -> str:
    """sha256 of the manifest's content without its own hash: key order and whitespace do not count."""
    content = {k: v for k, v in meta.items() if k != MANIFEST_DIGEST_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", errors="backslashreplace")).hexdigest()


def sealed(meta: dict) -> dict:
    """The manifest as export writes it: with its own hash."""
    return {**meta, MANIFEST_DIGEST_KEY: manifest_digest(meta)}


def manifest_state(meta: dict) -> str:
    """'as exported', 'edited' (its content differs from what export wrote) or 'not recorded' (an older bundle)."""
    if MANIFEST_DIGEST_KEY not in meta:
        return "not recorded"
    return "as exported" if meta[MANIFEST_DIGEST_KEY] == manifest_digest(meta) else "edited"


_warned: set[str] = set()


def warn_if_edited(folder: Path, meta: dict) -> None:
    """One warning per bundle and process when capcli.json differs from what export wrote."""
    key = os.path.realpath(folder)
    if manifest_state(meta) != "edited" or key in _warned:
        return
    _warned.add(key)
    from capcli.console import warn

    warn(f"bundle '{folder}': {MANIFEST} differs from what capcli export wrote (edited since?); it is used as it "
         f"is now (capcli inspect {folder} shows the bundle)")


# --- reading a bundle ------------------------------------------------------------------------------------


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The bundle's capcli.json, checked against the schema; with verify, every named file's sha256 too."""
    folder = Path(folder)
    path = folder / MANIFEST
    _check_manifest_file(folder, path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise CapcliError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a capcli bundle manifest")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CapcliError(
            f"bundle format version {version!r} is not supported (this capcli reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); export the run again with this capcli"
        )
    validate_manifest(meta, str(path))
    if verify:
        verify_files(folder, meta)
        warn_if_edited(folder, meta)
    return meta


def _check_manifest_file(folder: Path, path: Path) -> None:
    """A regular file of a sane size, said accurately otherwise: reading a FIFO would hang, a huge file would
    fill the memory before the schema could refuse it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CapcliError(f"{path}: a symbolic link to a file that does not exist") from None
        raise CapcliError(f"'{folder}' is not a capcli bundle (no {MANIFEST}); create one with capcli export") from None
    except OSError as exc:  # a symlink loop (ELOOP), a folder we may not enter, ...
        raise CapcliError(f"{path}: cannot read ({describe_os_error(exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CapcliError(f"{path}: a folder, not the bundle's manifest file")
    if not stat.S_ISREG(st.st_mode):
        raise CapcliError(f"{path}: not a regular file (a FIFO, socket or device); refused unread")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: {st.st_size} bytes, more than a manifest's {MAX_MANIFEST_BYTES}; "
                            "refused unread")


def bundle_file(folder: Path, name: str) -> Path:
    """A file the manifest names, refused unless it is a regular file inside the bundle folder."""
    problem = plain_name_problem(name)
    if problem:
        raise ManifestError(f"bundle '{folder}': file name {problem}")
    path = folder / name
    if not path.is_file():
        raise CapcliError(f"bundle '{folder}': {name} {_not_a_file(path)}")
    if path.is_symlink() and Path(os.path.realpath(path)).parent != Path(os.path.realpath(folder)):
        raise CapcliError(f"bundle '{folder}': {name} points outside the bundle folder")
    return path


def _not_a_file(path: Path) -> str:
    """What is at `path` instead of a regular file, in words."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is a symbolic link to nothing" if path.is_symlink() else "is missing (the bundle is incomplete)"
    except OSError as exc:
        return f"cannot be read ({describe_os_error(exc)})"
    return "is a folder, not a file" if stat.S_ISDIR(st.st_mode) else "is not a regular file (a FIFO, socket or device)"


def verify_files(folder: Path, meta: dict) -> None:
    """Every file the manifest hashes exists inside the folder with that sha256, and every file a graph loads
    (ONNX external data) is one of them: an unhashed weights file beside a hashed graph could be swapped."""
    for name, expected in meta["sha256"].items():
        path = bundle_file(folder, name)
        if sha256_file(path) != expected:
            raise CapcliError(f"bundle '{folder}' was altered: sha256 of {name} does not match {MANIFEST}")
    for role in GRAPH_FILES:
        graph = meta["files"][role]
        try:
            locations = external_data_files(folder / graph)
        except ValueError as exc:
            raise CapcliError(f"bundle '{folder}': {graph} is not a readable ONNX graph ({exc})") from None
        for location in locations:
            problem = plain_name_problem(location)
            if problem:
                raise CapcliError(f"bundle '{folder}': {graph} loads external data from {location!r:.80}, which "
                                  f"{problem}; refused")
            if location not in meta["sha256"]:
                raise CapcliError(f"bundle '{folder}': {graph} loads external data from {location}, which "
                                  f"{MANIFEST} does not hash; refused (export the run again)")


def load_vocabulary(folder: Path, meta: dict):
    """vocab.json, refused unless it is the vocabulary the manifest (and so the graphs) were made with."""
    from capcli.data.text import SPECIALS, Vocabulary

    name = meta["files"]["vocab"]
    vocab = Vocabulary.load(bundle_file(folder, name))
    if len(vocab) != meta["vocab_size"]:
        raise CapcliError(f"bundle '{folder}': {name} has {len(vocab)} words, {MANIFEST} says vocab_size "
                          f"{meta['vocab_size']}")
    if vocab.sha256 != meta["vocab_sha256"]:
        raise CapcliError(f"bundle '{folder}': {name} is not the vocabulary the model was exported with "
                          f"(vocab_sha256 differs)")
    for token, word in zip(SPECIAL_TOKENS, SPECIALS, strict=True):
        if meta["special_tokens"][token] != vocab.stoi[word]:
            raise ManifestError(f"bundle '{folder}': 'special_tokens.{token}' is not the id of {word} in {name}")
    return vocab


def bundle_report(folder: str | Path) -> dict:
    """What `capcli inspect` shows: the model, how it was trained, and each part of the bundle's integrity (each
    hashed file: ok, altered, missing or unreadable; capcli.json: as exported, edited or not recorded)."""
    folder = Path(folder)
    meta = read_manifest(folder, verify=False)  # a manifest that breaks the schema is one error, as on load
    files = {}
    for name, expected in meta["sha256"].items():
        try:
            files[name] = "ok" if sha256_file(bundle_file(folder, name)) == expected else "altered"
        except (CapcliError, OSError):
            files[name] = "missing" if not os.path.lexists(folder / name) else "unreadable"
    state = manifest_state(meta)
    return {
        "bundle": str(folder), "format_version": meta["format_version"], "backbone": meta["backbone"],
        "decoder": meta.get("decoder_kind", "pooled"), "vocab_size": meta["vocab_size"], "max_len": meta["max_len"],
        "created": meta.get("created"), "capcli_version": meta.get("capcli_version"),
        "training": meta.get("training"), "quantization": (meta.get("quantization") or {}).get("mode"),
        "files": files, "manifest": state, "intact": set(files.values()) <= {"ok"} and state != "edited",
    }
