"""Parsing a safetensors header without reading any tensor data, and trusting none of it.

A safetensors file is 8 bytes of little-endian header length N, N bytes of UTF-8 JSON, then the
data buffer. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the buffer) plus an optional ``__metadata__`` of string pairs. Like the
reference reader we check everything: the length against the file size, the JSON, every dtype,
shape and offset, that the sizes match numel * itemsize, and that the tensors tile the buffer
with no gap or overlap up to the end of the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..dtypes import DType, dtype_by_name
from ..errors import CheckpointError, tensor_context

__all__ = ["TensorInfo", "Header", "read_header", "MAX_HEADER_BYTES"]

#: safetensors itself refuses headers over 100 MB
MAX_HEADER_BYTES = 100_000_000


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


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of one safetensors file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
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
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"invalid header JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "invalid header: the JSON is not an object")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
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
    return Header(path=path, tensors=tuple(entries), metadata=dict(metadata), file_size=file_size)


def _parse_entry(path: str, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, "invalid header entry: not an object", name)
    dtype = dtype_by_name(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise _fail(path, f"unknown dtype {entry.get('dtype')!r}", name)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(path, f"invalid shape {shape!r}", name)
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise _fail(path, f"invalid data_offsets {offsets!r}", name)
    begin, end = offsets
    numel = math.prod(shape)  # Python ints: no overflow
    if end - begin != numel * dtype.itemsize:
        raise _fail(path, f"data_offsets {offsets} hold {end - begin} bytes but shape {tuple(shape)} "
                          f"of {dtype.name} needs {numel * dtype.itemsize}", name)
    return TensorInfo(name=name, path=path, dtype=dtype, shape=tuple(shape),
                      offset=data_start + begin, nbytes=end - begin)
