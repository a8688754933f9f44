"""The files an ONNX graph loads (its external data), read from its protobuf with the standard library.

onnx is not a runtime dependency, so the few fields that can name a file are walked by hand: every tensor
(initializers, sparse ones, Constant and other attributes, in subgraphs and functions too) whose
data_location is EXTERNAL names its file in external_data["location"]. Field numbers are onnx.proto's.
"""

from __future__ import annotations

import os
from pathlib import Path

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
