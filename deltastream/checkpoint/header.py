"""Parsing a safetensors header without reading any tensor data, and trusting none of it.

A safetensors file is 8 bytes of little-endian header length N, N bytes of UTF-8 JSON, then the
data buffer. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the buffer) plus an optional ``__metadata__`` of string pairs. Like the
reference reader we check everything: that the file is a regular file, the length against the
file size, the JSON (as strictly as serde_json: no duplicate keys, no lone surrogates, integers
within u64, at most 127 levels of nesting), every dtype, shape and offset, that the sizes match
numel * itemsize within u64, and that the tensors tile the buffer with no gap or overlap up to
the end of the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ..dtypes import DType, dtype_by_name
from ..errors import CheckpointError, escape, show, tensor_context

__all__ = ["TensorInfo", "Header", "read_header", "open_regular", "load_json", "MAX_HEADER_BYTES"]

#: safetensors itself refuses headers over 100 MB
MAX_HEADER_BYTES = 100_000_000
#: sizes and offsets are u64 in safetensors; a JSON integer beyond this is refused
U64_MAX = 2**64 - 1
#: serde_json, safetensors' parser, refuses a 128th level of nesting
MAX_JSON_DEPTH = 127

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFDIR: "a folder", stat.S_IFSOCK: "a socket"}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range."""

    name: str
    path: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed safetensors file: its tensors in data order and its ``__metadata__``."""

    path: str
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    file_size: int


def _fail(path: str, message: str, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(f"{tensor_context(path, tensor)}: {message}")


def open_regular(path: str, limit: int | None = None, what: str = "file") -> BinaryIO:
    """Open an input for reading, refusing anything but a regular file (a link to one is fine).

    A FIFO would block forever and a device such as /dev/zero reads without end, so the open does
    not block (O_NONBLOCK) and the opened file is checked by fstat, not by name (no race).
    ``limit`` bounds the size of files that are read whole.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = f"not a regular file ({_KINDS.get(stat.S_IFMT(info.st_mode), 'a special file')})"
    elif limit is not None and info.st_size > limit:
        problem = f"{what} of {info.st_size} bytes exceeds the {limit}-byte limit for {what}s"
    if problem:
        os.close(fd)
        raise _fail(path, problem)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class _NotJSON(Exception):
    """JSON that json.loads would take but serde_json (and so safetensors) refuses."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _NotJSON(f"duplicate key '{escape(k)}'")
            seen.add(k)
    return doc


def _u64_int(literal: str) -> int | float:
    digits = literal.lstrip("-")
    if len(digits) > 20 or int(literal) > U64_MAX:  # the length first: int() of 5000 digits raises
        raise _NotJSON(f"a {len(digits)}-digit integer is out of range (more than 2**64-1)")
    return -0.0 if literal == "-0" else int(literal)  # serde reads -0 as a float: never a size


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        shown = literal if len(literal) <= 40 else literal[:40] + "..."
        raise _NotJSON(f"{shown} is not a finite JSON number")
    return value


def _no_constant(literal: str) -> float:
    raise _NotJSON(f"{literal} is not a finite JSON number")


def _depth(raw: bytes | bytearray) -> int:
    """How deeply the JSON nests, counted before parsing (the parser recurses once per level):
    brackets outside strings, a block at a time so that a hostile header costs no more than its size."""
    text = np.frombuffer(raw.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)  # escapes hide no quote
    quotes = level = deepest = 0
    for start in range(0, text.size, 1 << 20):
        block = text[start:start + (1 << 20)]
        is_quote = block == ord('"')
        outside = (quotes + np.cumsum(is_quote)) % 2 == 0
        step = ((block == ord("[")) | (block == ord("{"))).astype(np.int8) - ((block == ord("]")) | (block == ord("}")))
        levels = level + np.cumsum(step * outside)
        quotes, level, deepest = quotes + int(is_quote.sum()), int(levels[-1]), max(deepest, int(levels.max()))
    return deepest


def _lone_surrogate(value: object) -> str | None:
    """The first string (key or value) in parsed JSON that is not valid UTF-8, if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    items = [*value, *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _lone_surrogate(item)
        if found is not None:
            return found
    return None


def load_json(path: str, raw: bytes | bytearray, what: str) -> object:
    """Parse a header or index as strictly as serde_json does, each refusal one line naming ``path``."""
    if _depth(raw) > MAX_JSON_DEPTH:
        raise _fail(path, f"invalid {what} JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_int=_u64_int,
                         parse_float=_finite_float, parse_constant=_no_constant)
    except _NotJSON as exc:
        raise _fail(path, f"invalid {what} JSON: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"invalid {what} JSON ({exc.__class__.__name__}: {exc})") from None
    bad = _lone_surrogate(doc) if _SURROGATE_ESCAPE.search(raw) else None  # only escapes make one
    if bad is not None:
        raise _fail(path, f"invalid {what}: the string {show(bad)} holds a lone surrogate escape "
                          "(not valid UTF-8)")
    return doc


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of one safetensors file."""
    path = os.fspath(path)
    with open_regular(path) as f:
        try:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise _fail(path, f"not a safetensors file: {file_size} bytes, too short for a header")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + length > file_size:
                raise _fail(path, f"header length {length} runs past the end of the file "
                                  f"({file_size} bytes): truncated or not a safetensors file")
            raw = f.read(length)
        except OSError as exc:
            raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    doc = load_json(path, raw, "header")
    if not isinstance(doc, dict):
        raise _fail(path, "invalid header: the JSON is not an object")

    metadata = doc.pop("__metadata__", None)  # null is no metadata, as safetensors reads it
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "invalid header: __metadata__ must map strings to strings")

    data_start = 8 + length
    buffer_size = file_size - data_start
    entries = [_parse_entry(path, name, entry, data_start) for name, entry in doc.items()]
    entries.sort(key=lambda t: (t.offset, t.nbytes))

    # The tensors must tile the buffer exactly: sorted by offset, each starts where the last ended.
    position = data_start
    for info in entries:
        if info.offset < position:
            raise _fail(path, f"data offsets overlap the previous tensor (starts at byte "
                              f"{info.offset - data_start}, previous ends at {position - data_start})",
                        info.name)
        if info.offset > position:
            raise _fail(path, f"gap in the data buffer before this tensor (bytes "
                              f"{position - data_start}..{info.offset - data_start} belong to no tensor)",
                        info.name)
        if info.offset + info.nbytes > file_size:
            raise _fail(path, f"data offsets end at byte {info.offset + info.nbytes - data_start} of a "
                              f"{buffer_size}-byte data buffer: file truncated", info.name)
        position = info.offset + info.nbytes
    if position != file_size:
        raise _fail(path, f"{file_size - position} bytes after the last tensor's data: "
                          "the file is not a valid safetensors file")
    return Header(path=path, tensors=tuple(entries), metadata=metadata, file_size=file_size)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0  # <= U64_MAX: parsed so


def _parse_entry(path: str, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, "invalid header entry: not an object", name)
    dtype_name = entry.get("dtype")
    dtype = dtype_by_name(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise _fail(path, f"unknown dtype {show(entry.get('dtype'))}", name)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise _fail(path, f"invalid shape {show(shape)}", name)
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets) \
            or offsets[1] < offsets[0]:
        raise _fail(path, f"invalid data_offsets {show(offsets)}", name)
    numel = 1
    for d in shape:  # as safetensors counts: every partial product within u64, a later 0 or not
        numel *= d
        if numel > U64_MAX:
            raise _fail(path, f"shape {show(shape)} has more than 2**64-1 elements", name)
    if numel * dtype.itemsize > U64_MAX:
        raise _fail(path, f"shape {show(shape)} of {dtype.name} is more than 2**64-1 bytes", name)
    begin, end = offsets
    if end - begin != numel * dtype.itemsize:
        raise _fail(path, f"data_offsets {offsets} hold {end - begin} bytes but shape {tuple(shape)} "
                          f"of {dtype.name} needs {numel * dtype.itemsize}", name)
    return TensorInfo(name=name, path=path, dtype=dtype, shape=tuple(shape),
                      offset=data_start + begin, nbytes=end - begin)
