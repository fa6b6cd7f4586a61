"""The artifact on disk: a zarr v3 group of per-tensor arrays, side files, and a manifest.

Layout (docs/format.md is the normative spec)::

    OUT.dsz/zarr.json                 root group; attributes["deltastream"] = the manifest
    OUT.dsz/tensors/000042/<role>     arrays of tensor 42 (manifest order), e.g. "xor"
    OUT.dsz/sidefiles/000             uint8 arrays holding config.json, tokenizer files...

Tensor and side-file names live only in the manifest; paths are built from indices, so no name
(``../x``, ``/abs``, 10 kB long, non-ASCII) can reach outside the store. Each plan chunk is
exactly one zarr chunk of each array, so every task owns whole chunks and never another's.

An artifact may come from anyone, so every file of it is read by :func:`read_file`: regular
files only (a symlink, FIFO or device is refused without blocking), of a size known and bounded
before reading. A tensor's arrays are read with the layout their ``zarr.json`` records, which
must be the method's plan (:func:`recorded_array`); state arrays and side files must be the
planned ones (:func:`check_array_meta`); every chunk decodes into a buffer of its length.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from typing import Any

import numpy as np

from ..checkpoint.header import load_json
from ..checkpoint.sidefiles import load_side_file
from ..checksum import crc32c
from ..errors import ArtifactError, CheckpointError, CorruptChunkError, escape, tensor_context
from ..methods import StoredArray
from ..scratch import scratch
from .codecs import PRESETS, ChecksumError, decode_chunk, encode_chunk, write_file_atomic
from .layout import LAYOUT_FIELDS, array_meta, layout_difference, recorded_layout

__all__ = [
    "tensor_key", "create_arrays", "write_chunk", "read_chunk", "valid_len", "chunk_file", "read_file", "read_json",
    "check_array_meta", "recorded_array", "write_state_arrays", "read_state_arrays", "write_side_files",
    "read_side_file", "side_file_size", "write_root_attrs", "read_root_attrs", "stored_bytes", "MAX_MANIFEST_BYTES",
    "FileRefused",
]

#: the largest root zarr.json read (the manifest: ~40 bytes per chunk of the model)
MAX_MANIFEST_BYTES = 64 << 20
#: the largest zarr.json of an array or group
MAX_META_BYTES = 1 << 20


class FileRefused(ValueError):
    """A file of the artifact that is not a regular file, or larger than it can be."""


_LINK = "is a symbolic link (only regular files inside the artifact are read)"


def tensor_key(index: int) -> str:
    return f"tensors/{index:06d}"


_GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def read_file(path: str, limit: int) -> bytearray:
    """The bytes of the regular file ``path``, at most ``limit`` of them. Its last component is
    not followed if a symlink; a FIFO or device is refused before it is opened (lstat), and if
    one replaces the file meanwhile, without blocking (O_NONBLOCK, then fstat). The size is
    known before reading: a hostile artifact can neither hang the job nor exhaust its memory.
    Raises FileRefused, or OSError (FileNotFoundError: missing)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise FileRefused(_LINK)
    if not stat.S_ISREG(mode):
        raise FileRefused("not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileRefused(_LINK) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused("not a regular file")
        if st.st_size > limit:
            raise FileRefused(f"{st.st_size} bytes, more than the {limit} it can hold")
        buf = bytearray(st.st_size)
        view, done = memoryview(buf), 0
        while done < st.st_size:
            n = os.readv(fd, [view[done:]])
            if n == 0:
                break
            done += n
        return buf if done == st.st_size else buf[:done]  # no copy of a whole chunk
    finally:
        os.close(fd)


def read_json(path: str, limit: int = MAX_META_BYTES) -> Any:
    """A JSON file of the artifact, read by read_file and parsed as strictly as a safetensors
    header (checkpoint.header.load_json): a duplicate key (which another zarr reader may resolve
    otherwise), NaN or Infinity, an integer beyond 64 bits, a lone surrogate escape or deep
    nesting is refused."""
    raw = read_file(path, limit)
    try:
        return load_json(path, raw, "metadata")
    except CheckpointError as exc:  # "file 'PATH': invalid metadata JSON: ...": the caller names the file
        message, prefix = str(exc), f"{tensor_context(path)}: "
        raise FileRefused(message[len(prefix):] if message.startswith(prefix) else message) from None


def _refusal(exc: BaseException, spec: StoredArray | None = None) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, MemoryError) and spec is not None:
        return f"its planned length of {spec.chunk_len * np.dtype(spec.dtype).itemsize} bytes cannot be allocated"
    if isinstance(exc, (FileRefused, ChecksumError)):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


def _write_array(folder: str, spec: StoredArray, attributes: dict | None = None) -> None:
    os.makedirs(os.path.join(folder, "c"), exist_ok=True)
    write_file_atomic(os.path.join(folder, "zarr.json"), json.dumps(array_meta(spec, attributes), indent=2).encode())


def create_arrays(root: str, key: str, arrays: list[StoredArray]) -> None:
    """Create a tensor's group and arrays: metadata only, the chunks are written by the tasks."""
    folder = os.path.join(root, key)
    for group in (os.path.dirname(folder), folder):
        os.makedirs(group, exist_ok=True)
        if not os.path.exists(os.path.join(group, "zarr.json")):
            write_file_atomic(os.path.join(group, "zarr.json"), _GROUP_JSON)
    for spec in arrays:
        _write_array(os.path.join(folder, spec.role), spec)


def _read_array_meta(root: str, key: str, role: str, owner: str) -> tuple[str, Any]:
    """An array's zarr.json (path, parsed), its folders checked to be plain folders of the store."""
    folder = os.path.join(root, key, role)
    path = os.path.join(folder, "zarr.json")
    try:
        rel = os.path.relpath(os.path.join(folder, "c"), root)
        for depth in range(1, len(rel.split(os.sep)) + 1):
            part = os.path.join(root, *rel.split(os.sep)[:depth])
            if os.path.lexists(part) and not stat.S_ISDIR(os.lstat(part).st_mode):
                raise FileRefused(f"'{escape(part)}' is not a folder of the artifact")
        return path, read_json(path)
    except (OSError, FileRefused) as exc:
        raise ArtifactError(f"{owner} in file '{escape(path)}': unreadable array metadata ({_refusal(exc)})") from None


def _check_fields(path: str, meta: Any, expected: dict, fields: tuple[str, ...], owner: str) -> None:
    for name in fields:
        got = meta.get(name) if isinstance(meta, dict) else None
        if got != expected.get(name):
            raise ArtifactError(f"{owner} in file '{escape(path)}': array metadata does not match the manifest "
                                f"({name} is {escape(json.dumps(got))[:200]}, "
                                f"expected {json.dumps(expected.get(name))})")


def check_array_meta(root: str, key: str, spec: StoredArray, owner: str, attributes: dict | None = None) -> None:
    """Refuse an array whose folders are not plain folders of the store, or whose zarr.json
    says another dtype, shape, chunking or codec chain than the plan (what create_arrays would
    write): any zarr reader must see what deltastream decodes. ``owner`` names the tensor."""
    path, meta = _read_array_meta(root, key, spec.role, owner)
    _check_fields(path, meta, array_meta(spec, attributes), LAYOUT_FIELDS + (("attributes",) if attributes else ()),
                  owner)


def recorded_array(root: str, key: str, planned: StoredArray, owner: str) -> StoredArray:
    """The layout of a tensor's array as its zarr.json records it, which the reader then uses:
    refused, saying what differs, where it is not the method's plan (an artifact written with
    another layout of the method, or modified), and where any other layout field is not what
    deltastream writes (so that any zarr reader sees what deltastream decodes)."""
    path, meta = _read_array_meta(root, key, planned.role, owner)
    try:
        recorded = recorded_layout(meta, planned.role)
    except ValueError as exc:
        raise ArtifactError(f"{owner} in file '{escape(path)}': array metadata is not an array deltastream "
                            f"writes ({escape(str(exc))})") from None
    difference = layout_difference(recorded, planned)
    if difference is not None:
        raise ArtifactError(f"{owner} in file '{escape(path)}': array layout differs from the method's plan "
                            f"({difference}): written by another layout of the method, or modified")
    _check_fields(path, meta, array_meta(recorded), LAYOUT_FIELDS, owner)
    return recorded


def chunk_file(root: str, key: str, role: str, chunk_index: int) -> str:
    """Where zarr keeps one chunk of a 1-D array with the default chunk key encoding (role "":
    the array at ``key`` itself, as a side file is)."""
    return os.path.join(root, key, role, "c", str(chunk_index))


def valid_len(spec: StoredArray, chunk_index: int) -> int:
    """How many elements of chunk ``chunk_index`` are data (the rest of an edge chunk is padding)."""
    return max(0, min(spec.chunk_len, spec.total_len - chunk_index * spec.chunk_len))


def write_chunk(root: str, key: str, spec: StoredArray, chunk_index: int, data: np.ndarray) -> int:
    """Encode one chunk as zarr would and write it whole (an edge chunk is padded with zeros to
    the chunk length, as zarr stores it); return the CRC-32C of its valid part, computed on
    ``data`` in memory (what a reader's decode must reproduce), not on the file."""
    if data.size < spec.chunk_len:
        padded = scratch("store.pad", spec.chunk_len, spec.dtype)
        padded[: data.size] = data
        padded[data.size:] = 0
        data = padded
    data = data.astype(spec.dtype, copy=False)
    path = chunk_file(root, key, spec.role, chunk_index)
    write_file_atomic(path, *encode_chunk(data, PRESETS[spec.compression]))
    return crc32c(data[: valid_len(spec, chunk_index)])


def _read_array_chunk(root: str, key: str, spec: StoredArray, chunk_index: int, tag: str | None) -> np.ndarray:
    """One chunk's valid part, decoded into this thread's scratch buffer ``tag`` (None: a new
    zeroed one); the file may be no larger than its codec's worst case for the planned length."""
    preset = PRESETS[spec.compression]
    raw = read_file(chunk_file(root, key, spec.role, chunk_index),
                    preset.max_encoded(spec.chunk_len * np.dtype(spec.dtype).itemsize))
    out = scratch(tag, spec.chunk_len, spec.dtype) if tag else np.zeros(spec.chunk_len, spec.dtype)
    decode_chunk(raw, preset, out)
    return out[: valid_len(spec, chunk_index)]


def read_chunk(root: str, key: str, spec: StoredArray, chunk_index: int, tensor: str,
               crc: int | None = None) -> np.ndarray:
    """Decode one chunk (its valid part) into this thread's scratch buffer for the role: the view
    is valid until the thread reads that role again. With ``crc`` (format 1.1), the data must
    have that CRC-32C. A missing, special or oversized file, a bad checksum or a failed decode
    names the tensor and the chunk file."""
    path = chunk_file(root, key, spec.role, chunk_index)
    try:
        data = _read_array_chunk(root, key, spec, chunk_index, f"store.read.{spec.role}")
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # MemoryError: a backstop, lengths are bounded
        raise CorruptChunkError(f"{tensor_context(path, tensor)}: corrupt artifact chunk "
                                f"({_refusal(exc, spec)})") from None
    if crc is not None and crc32c(data) != crc:
        raise CorruptChunkError(f"{tensor_context(path, tensor)}: corrupt artifact chunk (its data does not match "
                                "the CRC-32C the manifest records)")
    return data


def _state_spec(name: str, size: int) -> StoredArray:
    return StoredArray(f"state.{name}", np.dtype("<f4"), max(1, size), size, "raw")


def write_state_arrays(root: str, key: str, state: dict[str, Any]) -> tuple[list[str], dict[str, list[int]]]:
    """Store the numpy arrays of a tensor's state (e.g. per-row scales) as one-chunk float32
    arrays ``<key>/state.<name>``; return their names and {role: [CRC-32C]}. Other state values
    go to the manifest."""
    names, crcs = [], {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            flat = np.ascontiguousarray(value, np.float32).reshape(-1)
            spec = _state_spec(name, flat.size)
            create_arrays(root, key, [])
            _write_array(os.path.join(root, key, spec.role), spec, {"shape": list(value.shape)})
            crcs[spec.role] = [write_chunk(root, key, spec, 0, flat) if flat.size else 0]
            names.append(name)
    return names, crcs


def read_state_arrays(root: str, key: str, shapes: dict[str, tuple[int, ...]], crcs: dict[str, list[int]] | None,
                      tensor: str) -> dict[str, np.ndarray]:
    """The state arrays of a tensor, of the shapes its method declares: the metadata must say
    so, and the data (read no larger than the shape) must match its CRC where one is recorded."""
    out = {}
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        spec = _state_spec(name, size)
        check_array_meta(root, key, spec, f"tensor '{escape(tensor)}'", {"shape": list(shape)})
        crc = crcs[spec.role][0] if crcs is not None else None
        flat = read_chunk(root, key, spec, 0, tensor, crc).copy() if size else np.empty(0, np.float32)
        out[name] = flat.reshape(shape)
    return out


def write_side_files(root: str, side_files: dict[str, str]) -> tuple[dict[str, str], dict[str, dict]]:
    """Store each side file as a zstd uint8 array; return name -> array key and name ->
    {"bytes", "sha256"} for the manifest."""
    keys, digests = {}, {}
    for i, (name, path) in enumerate(side_files.items()):
        raw = load_side_file(path)
        key = f"sidefiles/{i:03d}"
        spec = _side_spec(len(raw))
        _write_array(os.path.join(root, key), spec)
        if raw:
            write_chunk(root, key, spec, 0, np.frombuffer(raw, np.uint8))
        keys[name] = key
        digests[name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return keys, digests


def _side_spec(size: int) -> StoredArray:
    return StoredArray("", np.dtype(np.uint8), max(1, size), size, "text")


def read_side_file(root: str, key: str, name: str, size: int, sha256: str | None = None) -> bytes:
    """A side file's bytes: its array must be the planned one for ``size`` bytes, and, where
    the manifest records one (format 1.1), its sha256 must match (two swapped files differ)."""
    owner = f"side file '{escape(name)}'"
    spec = _side_spec(size)
    check_array_meta(root, key, spec, owner)
    path = chunk_file(root, key, "", 0)
    try:
        data = _read_array_chunk(root, key, spec, 0, None).tobytes() if size else b""
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise CorruptChunkError(f"{owner} in file '{escape(path)}': corrupt artifact chunk "
                                f"({_refusal(exc, spec)})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptChunkError(f"{owner} in file '{escape(path)}': its contents do not match the sha256 the "
                                "manifest records (corrupt, or another file's)")
    return data


def side_file_size(root: str, key: str, name: str, limit: int) -> int:
    """A format 1.0 side file's size, from its zarr.json (1.1 records it in the manifest)."""
    path = os.path.join(root, key, "zarr.json")
    try:
        meta = read_json(path)
        size = meta["shape"][0]
        if type(size) is not int or not 0 <= size <= limit:
            raise FileRefused(f"a size of {escape(size)[:40]} bytes is out of range")
    except (OSError, FileRefused, KeyError, IndexError, TypeError) as exc:
        raise ArtifactError(f"side file '{escape(name)}' in file '{escape(path)}': unreadable array metadata "
                            f"({_refusal(exc)})") from None
    return size


def write_root_attrs(root: str, attrs: dict[str, Any]) -> None:
    """Write the root group's zarr.json with these attributes (non-finite numbers refused: a
    reader would refuse them)."""
    try:
        doc = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}, indent=1, allow_nan=False)
    except ValueError:
        raise ArtifactError(f"file '{escape(root)}': the manifest would hold a non-finite number") from None
    os.makedirs(root, exist_ok=True)
    write_file_atomic(os.path.join(root, "zarr.json"), doc.encode())


def read_root_attrs(root: str) -> dict[str, Any]:
    if not os.path.exists(root):
        raise ArtifactError(f"file '{escape(root)}': no such file or folder")
    path = os.path.join(root, "zarr.json")
    if not os.path.lexists(path):
        raise ArtifactError(f"file '{escape(root)}': not a deltastream artifact (no zarr.json)")
    try:
        meta = read_json(path, MAX_MANIFEST_BYTES)
    except (OSError, FileRefused) as exc:
        raise ArtifactError(f"file '{escape(path)}': not a readable zarr v3 group ({_refusal(exc)})") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or not isinstance(meta.get("attributes"), dict):
        raise ArtifactError(f"file '{escape(path)}': not a readable zarr v3 group")
    return meta["attributes"]


def stored_bytes(root: str, key: str) -> int:
    """Bytes on disk under one key (metadata included; links are not followed)."""
    total = 0
    for folder, _, files in os.walk(os.path.join(root, key)):
        total += sum(os.lstat(os.path.join(folder, f)).st_size for f in files)
    return total
