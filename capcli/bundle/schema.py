"""The bundle manifest's schema (capcli.json): its constants, one checker per kind of value, and
`validate_manifest`, which names the first bad key in one clear error. Standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from capcli.backbone import RESIZE_MODES
from capcli.errors import CapcliError
from capcli.model import DECODER_KINDS

FORMAT = "capcli-bundle"
# 2: graphs carry capcli metadata (vocabulary and model hashes); every file is hashed.
# 3: the attention decoder: decoder_kind, the decoder's state and context inputs, the grid.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # a version 2 bundle is a pooled one
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
# The recurrent inputs the decode step feeds (capcli.runtime.onnx_runtime.OnnxStep) and the per-image context inputs
# an attention decoder takes; the encoder outputs each state's initial value as NAME0.
STATE_INPUTS = ("h", "c")
CONTEXT_INPUTS = {"pooled": (), "attention": ("grid", "projection")}
# Keys of the metadata that export writes into both graphs, checked against the manifest on load.
GRAPH_VOCAB_KEY = "capcli.vocab_sha256"
GRAPH_MODEL_KEY = "capcli.source_checkpoint_sha256"
MANIFEST_DIGEST_KEY = "manifest_sha256"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(CapcliError):
    """capcli.json does not follow the schema: the message names the key."""


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
    ("preprocessing.resize_mode", _one_of(*RESIZE_MODES), False),  # absent: crop, as before resize modes
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
    ("classifier", _mapping, False),  # the encoder also returns class probabilities (capcli.guidance)
    ("classifier.labels", _text, False),
    ("classifier.classes", _integer(2, 100_000), False),
    ("classifier.output", _one_of("classes"), False),
    ("training", _mapping, False),  # how the weights were trained (capcli.bundle.export): absent before it was recorded
    ("training.stage", _one_of("cross-entropy", "scst"), False),
    (MANIFEST_DIGEST_KEY, _sha256, False),  # sha256 of the manifest without this key (capcli.bundle.manifest)
    ("quantization", _mapping, False),  # int8 bundles: how, and what the captions lost (capcli.bundle.quantize)
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


def check_preprocessing(prep: dict, where: str) -> None:
    """A backbone's preprocessing as a bundle would record it, checked before any export work: the schema's
    bounds on each value, and resize against input_size."""
    meta = {"preprocessing": prep}
    for key, check, _ in SCHEMA:
        if key.startswith("preprocessing.") and (value := _lookup(meta, key)) is not _ABSENT and (bad := check(value)):
            raise ManifestError(f"{where}: '{key}' {bad}")
    check_resize(meta, where)


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


def decoder_kind(meta: dict) -> str:
    """'pooled' or 'attention'; bundles from before format 3 are pooled."""
    return meta.get("decoder_kind", "pooled")


def state_inputs(meta: dict) -> list[str]:
    """The decoder's recurrent inputs, in the order the encoder outputs their initial values."""
    return list(meta.get("io", {}).get("state", ["h", "c"]))


def classifier(meta: dict) -> dict | None:
    """What the encoder's class probabilities are ({"labels", "classes", "output"}), or None without them."""
    head = meta.get("classifier")
    if head is None:
        return None
    if not {"labels", "classes", "output"} <= set(head):
        raise ManifestError(f"{MANIFEST}: 'classifier' needs 'labels', 'classes' and 'output'")
    return head


def context_inputs(meta: dict) -> list[str]:
    """The decoder's per-image context inputs (none for a pooled decoder)."""
    return list(meta.get("io", {}).get("context", []))
