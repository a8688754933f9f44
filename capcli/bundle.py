"""The exported bundle's manifest: its schema, reading it, and refusing bundles that were altered or mixed up.

`read_manifest` is the one door into a bundle: the manifest is checked against the schema below (one
clear error naming the first bad key), every file it names must be a plain name inside the folder and
match its sha256, and `load_vocabulary` ties vocab.json to the manifest. The runtimes then check the
graphs' shapes against the same manifest (capcli.runtime_onnx).

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
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capcli.errors import CapcliError
from capcli.paths import describe_os_error

FORMAT = "capcli-bundle"
# 2: graphs carry capcli metadata (vocabulary and model hashes); every file is hashed.
# 3: the attention decoder: decoder_kind, the decoder's state and context inputs, the grid.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # a version 2 bundle is a pooled one
DECODER_KINDS = ("pooled", "attention")
MANIFEST = "capcli.json"
MAX_MANIFEST_BYTES = 1 << 20  # an exported manifest is a few kB
INTERPOLATIONS = ("bilinear", "bicubic")
SPECIAL_TOKENS = ("pad", "start", "end", "unk")  # ids 0-3 of every capcli vocabulary
GRAPH_FILES = ("encoder", "decoder")
MAX_INPUT_SIZE = 2048  # pixels per side of the network input; far above any backbone's
MAX_LEN = 1000  # words per caption; a bound so a hand-edited manifest cannot make decoding run for ever
# Preprocessing works on pixels scaled to [0, 1]: a mean outside that range is no mean of pixels. A std of 1/255
# (a network fed 0-255 values) is the smallest in use; far below it every pixel's noise is magnified into
# saturated inputs, far above it the image fades to its mean. Both are a poisoned manifest, not a backbone.
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (1e-3, 10.0)
# The shorter side before the centre crop: at least the crop (else the crop would not be what the model saw)
# and at most this many times it (every backbone in use resizes by about 1.14; beyond this the crop would be
# a small zoomed-in patch of the photo).
MAX_RESIZE_RATIO = 4
# The recurrent inputs the decode step feeds (capcli.runtime_onnx.OnnxStep) and the per-image context inputs
# an attention decoder takes; the encoder outputs each state's initial value as NAME0.
STATE_INPUTS = ("h", "c")
CONTEXT_INPUTS = {"pooled": (), "attention": ("grid", "projection")}
# Keys of the metadata that export writes into both graphs, checked against the manifest on load.
GRAPH_VOCAB_KEY = "capcli.vocab_sha256"
GRAPH_MODEL_KEY = "capcli.source_checkpoint_sha256"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(CapcliError):
    """capcli.json does not follow the schema: the message names the key."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest itself (graphs, external data, vocab)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


# --- the schema: one checker per kind of value; each returns what is wrong, or None --------------------

Check = Callable[[Any], str | None]


def _integer(lo: int, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, not {_kind(v)}"
        if v < lo or (hi is not None and v > hi):
            return f"must be from {lo} to {hi}" if hi is not None else f"must be at least {lo}"
        return None

    return check


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else f"must be a non-empty string, not {_kind(v)}"


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)} (got {v!r:.40})"

    return check


def _numbers(count: int, positive: bool = False, within: tuple[float, float] | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or len(v) != count:
            return f"must be a list of {count} numbers"
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                return f"must be a list of {count} finite numbers"
            if positive and x <= 0:
                return f"must be a list of {count} positive numbers"
            if within is not None and not within[0] <= x <= within[1]:
                return f"must be a list of {count} numbers from {within[0]:g} to {within[1]:g} (got {x:g})"
        return None

    return check


def is_sha256(v: Any) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def _sha256(v: Any) -> str | None:
    return None if is_sha256(v) else "must be a sha256 (64 lowercase hex digits)"


def _mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else f"must be an object, not {_kind(v)}"


def _names(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        return "must be a list of input names"
    if len(set(v)) != len(v):
        return "names an input twice"
    return None


def plain_name_problem(name: Any) -> str | None:
    """Bundle files are plain names inside the bundle folder: no folders, no '..', nothing absolute."""
    if not isinstance(name, str) or not name:
        return "must be a file name"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name != name.strip():
        return f"must be a plain file name inside the bundle (got {name!r:.60})"
    if name == MANIFEST:
        return f"cannot be {MANIFEST} itself"
    return None


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__
    )


# key (dotted path), check, required
SCHEMA: list[tuple[str, Check, bool]] = [
    ("backbone", _text, True),
    ("preprocessing", _mapping, True),
    ("preprocessing.input_size", _integer(1, MAX_INPUT_SIZE), True),
    ("preprocessing.resize", _integer(1, 2 * MAX_INPUT_SIZE), True),
    ("preprocessing.mean", _numbers(3, within=MEAN_RANGE), True),
    ("preprocessing.std", _numbers(3, positive=True, within=STD_RANGE), True),
    ("preprocessing.interpolation", _one_of(*INTERPOLATIONS), True),
    ("preprocessing.crop", _one_of("center"), False),
    ("vocab_size", _integer(len(SPECIAL_TOKENS), 10_000_000), True),
    ("vocab_sha256", _sha256, True),
    ("special_tokens", _mapping, True),
    *((f"special_tokens.{name}", _integer(0), True) for name in SPECIAL_TOKENS),
    ("max_len", _integer(1, MAX_LEN), True),
    ("decoder", _mapping, True),
    ("decoder.hidden_dim", _integer(1), True),
    ("decoder.num_layers", _integer(1), True),
    ("decoder.vocab_size", _integer(len(SPECIAL_TOKENS)), True),
    ("files", _mapping, True),
    *((f"files.{name}", plain_name_problem, True) for name in (*GRAPH_FILES, "vocab")),
    ("sha256", _mapping, True),
    ("source_checkpoint", _text, False),
    ("source_checkpoint_sha256", _sha256, False),
    ("dataset", _mapping, False),
    ("decoder_kind", _one_of(*DECODER_KINDS), False),
    ("io", _mapping, False),
    ("io.state", _names, False),
    ("io.context", _names, False),
    ("grid", _mapping, False),
    ("grid.height", _integer(1, MAX_INPUT_SIZE), False),
    ("grid.width", _integer(1, MAX_INPUT_SIZE), False),
    ("grid.channels", _integer(1), False),
    ("quantization", _mapping, False),  # int8 bundles: how, and what the captions lost (capcli.quantize)
    ("quantization.mode", _one_of("int8", "float16"), False),
]

_ABSENT = object()


def _lookup(meta: dict, key: str) -> Any:
    node: Any = meta
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def validate_manifest(meta: Any, where: str = MANIFEST) -> dict:
    """The manifest if it follows the schema; else ManifestError naming the first bad key."""
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}: must be a JSON object, not {_kind(meta)}")
    for key, check, required in SCHEMA:
        value = _lookup(meta, key)
        if value is _ABSENT:
            if required:
                raise ManifestError(f"{where}: '{key}' is missing")
            continue
        problem = check(value)
        if problem:
            raise ManifestError(f"{where}: '{key}' {problem}")
    _check_consistency(meta, where)
    return meta


def check_resize(meta: dict, where: str = MANIFEST) -> None:
    """resize against input_size; the runtimes call it once the encoder graph has confirmed input_size, so a
    wrong input_size is reported as the graph mismatch it is."""
    prep = meta["preprocessing"]
    size, resize = prep["input_size"], prep["resize"]
    if not size <= resize <= MAX_RESIZE_RATIO * size:
        raise ManifestError(f"{where}: 'preprocessing.resize' must be from input_size ({size}) to "
                            f"{MAX_RESIZE_RATIO} times it ({MAX_RESIZE_RATIO * size}), got {resize}")


def _check_consistency(meta: dict, where: str) -> None:
    vocab_size = meta["vocab_size"]
    for name in SPECIAL_TOKENS:
        if meta["special_tokens"][name] >= vocab_size:
            raise ManifestError(f"{where}: 'special_tokens.{name}' must be below vocab_size ({vocab_size})")
    if meta["decoder"]["vocab_size"] != vocab_size:
        raise ManifestError(f"{where}: 'decoder.vocab_size' ({meta['decoder']['vocab_size']}) "
                            f"differs from 'vocab_size' ({vocab_size})")
    for name, digest in meta["sha256"].items():
        problem = plain_name_problem(name) or _sha256(digest)
        if problem:
            raise ManifestError(f"{where}: 'sha256' entry {name!r:.60} {problem}")
    for role, name in meta["files"].items():
        if name not in meta["sha256"]:
            raise ManifestError(f"{where}: 'sha256' has no entry for {name} (files.{role}); every file is hashed")
    _check_decoder_kind(meta, where)


def _check_decoder_kind(meta: dict, where: str) -> None:
    """Format 3 names its decoder kind; an attention bundle has a grid and context inputs, a pooled one neither."""
    if meta.get("format_version", 0) >= 3 and "decoder_kind" not in meta:
        raise ManifestError(f"{where}: 'decoder_kind' is missing")
    attention = decoder_kind(meta) == "attention"
    if attention and "grid" not in meta:
        raise ManifestError(f"{where}: 'grid' is missing (an attention bundle needs its height and width)")
    for key in ("decoder.context_dim", "decoder.attention_dim", "grid.height", "grid.width") if attention else ():
        value = _lookup(meta, key)
        problem = "is missing" if value is _ABSENT else _integer(1)(value)
        if problem:
            raise ManifestError(f"{where}: '{key}' {problem}")
    if attention != bool(context_inputs(meta)):
        need = "needs" if attention else "cannot have"
        raise ManifestError(f"{where}: 'io.context' is wrong: {_a(decoder_kind(meta))} decoder {need} context inputs")
    # Only the names the runtime can feed: anything else would surface later as a KeyError deep in decoding.
    # Whether the graphs take exactly these is checked against the graphs themselves when they are loaded.
    for key, names, known in (("io.state", state_inputs(meta), STATE_INPUTS),
                              ("io.context", context_inputs(meta), CONTEXT_INPUTS[decoder_kind(meta)])):
        if sorted(names) != sorted(known):
            raise ManifestError(f"{where}: '{key}' must name {_list(known) or 'no input'} for "
                                f"{_a(decoder_kind(meta))} decoder, not {_list(names) or 'none'}")


def _list(names) -> str:
    return ", ".join(repr(n)[:40] for n in names)


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


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


def decoder_kind(meta: dict) -> str:
    """'pooled' or 'attention'; bundles from before format 3 are pooled."""
    return meta.get("decoder_kind", "pooled")


def state_inputs(meta: dict) -> list[str]:
    """The decoder's recurrent inputs, in the order the encoder outputs their initial values."""
    return list(meta.get("io", {}).get("state", ["h", "c"]))


def context_inputs(meta: dict) -> list[str]:
    """The decoder's per-image context inputs (none for a pooled decoder)."""
    return list(meta.get("io", {}).get("context", []))


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


# --- the files an ONNX graph loads, read from its protobuf with the standard library ------------------------
# onnx is not a runtime dependency, so the few fields that can name a file are walked by hand: every tensor
# (initializers, sparse ones, Constant and other attributes, in subgraphs and functions too) whose
# data_location is EXTERNAL names its file in external_data["location"]. Field numbers are onnx.proto's.

_MODEL_MESSAGES = {7: "graph", 20: "training", 25: "function"}  # ModelProto
_GRAPH_MESSAGES = {1: "node", 5: "tensor", 15: "sparse"}  # GraphProto
_NODE_MESSAGES = {5: "attribute"}  # NodeProto (FunctionProto's nodes are field 7, as below)
_FUNCTION_MESSAGES = {7: "node", 11: "attribute"}  # FunctionProto (attribute_proto: defaults)
_ATTRIBUTE_MESSAGES = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE_MESSAGES = {1: "tensor", 2: "tensor"}  # SparseTensorProto values, indices
_TRAINING_MESSAGES = {1: "graph", 2: "graph"}  # TrainingInfoProto initialization, algorithm
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_MAX_NESTING = 64  # subgraphs inside subgraphs; a hostile file cannot recurse the reader into a crash


def external_data_files(path: Path) -> list[str]:
    """The external data files (ONNX `location`s) the graph at `path` loads, in order, each once."""
    import mmap

    found: dict[str, None] = {}
    problem = None
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            try:
                _walk(memoryview(mapped), "model", found, 0)
            except ValueError as exc:
                # Kept as text: the traceback's frames hold views of the map, which could not close under them.
                problem = str(exc)
    if problem is not None:
        raise ValueError(problem)
    return list(found)


_KINDS = {"model": _MODEL_MESSAGES, "graph": _GRAPH_MESSAGES, "node": _NODE_MESSAGES, "function": _FUNCTION_MESSAGES,
          "attribute": _ATTRIBUTE_MESSAGES, "sparse": _SPARSE_MESSAGES, "training": _TRAINING_MESSAGES}


def _walk(data: memoryview, kind: str, found: dict[str, None], depth: int) -> None:
    if depth > _MAX_NESTING:
        raise ValueError("nested too deeply")
    if kind == "tensor":
        _tensor(data, found)
        return
    children = _KINDS[kind]
    for field, wire, value in _fields(data):
        if wire == 2 and field in children:
            _walk(value, children[field], found, depth + 1)


def _tensor(data: memoryview, found: dict[str, None]) -> None:
    external, locations = False, []
    for field, wire, value in _fields(data):
        if field == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif field == _TENSOR_EXTERNAL_DATA and wire == 2:
            entry = {f: bytes(v) for f, w, v in _fields(value) if w == 2}  # StringStringEntryProto: key 1, value 2
            if entry.get(1) == b"location":
                locations.append(entry.get(2, b"").decode("utf-8", "replace"))
    if external:
        if not locations:
            raise ValueError("a tensor stored as external data names no location")
        found.update(dict.fromkeys(locations))


def _fields(data: memoryview):
    """(field number, wire type, value) of each field of one protobuf message: an int for varints and fixed
    widths, a memoryview for length-delimited fields (no copy: a graph's weights can be hundreds of MB)."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise ValueError("truncated")
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("truncated")
            value, pos = data[pos:pos + length], pos + length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if field == 0:
            raise ValueError("field number 0")
        yield field, wire, value


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


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
