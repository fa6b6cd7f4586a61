"""The artifact on disk: a zarr v3 group of per-tensor arrays, side files, and a manifest.

Layout (docs/format.md is the normative spec)::

    OUT.dsz/zarr.json                 root group; attributes["deltastream"] = the manifest
    OUT.dsz/tensors/000042/<role>     arrays of tensor 42 (manifest order), e.g. "xor"
    OUT.dsz/sidefiles/000             uint8 arrays holding config.json, tokenizer files...

Tensor and side-file names live only in the manifest; paths are built from indices, so no name
(``../x``, ``/abs``, 10 kB long, non-ASCII) can reach outside the store. Each plan chunk is
exactly one zarr chunk of each array, so every task owns whole chunks and never another's.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from typing import Any

import numpy as np
import zarr

from ..errors import ArtifactError, CorruptChunkError
from ..methods import StoredArray
from ..scratch import scratch
from .codecs import PRESETS, ChecksumError, decode_chunk, encode_chunk, write_file_atomic

__all__ = [
    "tensor_key", "create_arrays", "write_chunk", "read_chunk", "chunk_file",
    "write_side_files", "read_side_file", "write_root_attrs", "read_root_attrs", "stored_bytes",
]

_WRITE_CONFIG = {"write_empty_chunks": True}  # skip zarr's per-chunk fill-value comparison


def tensor_key(index: int) -> str:
    return f"tensors/{index:06d}"


_GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


@functools.lru_cache(maxsize=None)
def _array_template(dtype: str, preset: str) -> dict:
    """zarr's own metadata for a 1-D array of this dtype and codec chain (shape to be filled)."""
    store = zarr.storage.MemoryStore()
    zarr.create_array(store=store, shape=(1,), chunks=(1,), dtype=np.dtype(dtype), fill_value=0,
                      compressors=PRESETS[preset].zarr_compressors(np.dtype(dtype)), zarr_format=3)
    return json.loads(store._store_dict["zarr.json"].to_bytes())


def create_arrays(root: str, key: str, arrays: list[StoredArray]) -> None:
    """Create a tensor's group and arrays: metadata only, the chunks are written by the tasks.

    The metadata is zarr's own (made once per dtype and codec chain by zarr itself, then given
    this array's shape), written directly: creating hundreds of arrays through zarr's API took
    a second of a small job's time.
    """
    folder = os.path.join(root, key)
    for group in (os.path.dirname(folder), folder):
        os.makedirs(group, exist_ok=True)
        if not os.path.exists(os.path.join(group, "zarr.json")):
            write_file_atomic(os.path.join(group, "zarr.json"), _GROUP_JSON)
    for spec in arrays:
        meta = copy.deepcopy(_array_template(np.dtype(spec.dtype).str, spec.compression))
        meta["shape"] = [spec.total_len]
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [max(1, spec.chunk_len)]
        os.makedirs(os.path.join(folder, spec.role, "c"), exist_ok=True)
        write_file_atomic(os.path.join(folder, spec.role, "zarr.json"), json.dumps(meta, indent=2).encode())


def chunk_file(root: str, key: str, role: str, chunk_index: int) -> str:
    """Where zarr keeps one chunk of a 1-D array with the default chunk key encoding."""
    return os.path.join(root, key, role, "c", str(chunk_index))


def write_chunk(root: str, key: str, spec: StoredArray, chunk_index: int, data: np.ndarray) -> None:
    """Encode one chunk as zarr would and write it whole (an edge chunk is padded with zeros to
    the chunk length, as zarr stores it)."""
    if data.size < spec.chunk_len:
        padded = scratch("store.pad", spec.chunk_len, spec.dtype)
        padded[: data.size] = data
        padded[data.size:] = 0
        data = padded
    path = chunk_file(root, key, spec.role, chunk_index)
    write_file_atomic(path, *encode_chunk(data.astype(spec.dtype, copy=False), PRESETS[spec.compression]))


def read_chunk(root: str, key: str, spec: StoredArray, chunk_index: int, tensor: str) -> np.ndarray:
    """Decode one chunk (its valid part) into this thread's scratch buffer for the role: the view
    is valid until the thread reads that role again. A missing file, bad checksum or failed
    decode names the tensor and the chunk file."""
    path = chunk_file(root, key, spec.role, chunk_index)
    length = max(0, min(spec.chunk_len, spec.total_len - chunk_index * spec.chunk_len))
    try:
        with open(path, "rb") as f:
            raw = f.read()
        out = scratch(f"store.read.{spec.role}", spec.chunk_len, spec.dtype)
        decode_chunk(raw, PRESETS[spec.compression], out)
    except (OSError, ChecksumError, ValueError, RuntimeError) as exc:
        why = "missing" if isinstance(exc, FileNotFoundError) else f"{exc.__class__.__name__}: {exc}"
        raise CorruptChunkError(f"tensor '{tensor}' in file '{path}': corrupt artifact chunk ({why})") from None
    return out[:length]


def write_state_arrays(root: str, key: str, state: dict[str, Any]) -> list[str]:
    """Store the numpy arrays of a tensor's state (e.g. per-row scales) as one-chunk arrays
    ``<key>/state.<name>``; return their names. Other state values go to the manifest."""
    names = []
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            flat = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).reshape(-1)
            spec = StoredArray(f"state.{name}", flat.dtype, max(1, flat.size), flat.size, "raw")
            create_arrays(root, key, [spec])
            if flat.size:
                write_chunk(root, key, spec, 0, flat)
            meta_path = os.path.join(root, key, spec.role, "zarr.json")
            with open(meta_path) as f:
                meta = json.load(f)
            meta["attributes"] = {"shape": list(value.shape)}
            write_file_atomic(meta_path, json.dumps(meta, indent=2).encode())
            names.append(name)
    return names


def read_state_arrays(root: str, key: str, names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        with open(os.path.join(root, key, f"state.{name}", "zarr.json")) as f:
            meta = json.load(f)
        spec = StoredArray(f"state.{name}", np.dtype(meta["data_type"]), max(1, meta["shape"][0]),
                           meta["shape"][0], "raw")
        flat = read_chunk(root, key, spec, 0, name).copy() if spec.total_len else np.empty(0, spec.dtype)
        out[name] = flat.reshape(meta["attributes"]["shape"])
    return out


def write_side_files(root: str, side_files: dict[str, str]) -> dict[str, str]:
    """Store each side file as a zstd uint8 array; return name -> array key for the manifest."""
    keys = {}
    for i, (name, path) in enumerate(side_files.items()):
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
        key = f"sidefiles/{i:03d}"
        array = zarr.create_array(store=root, name=key, shape=data.shape, chunks=(max(1, data.size),),
                                  dtype=np.uint8, fill_value=0, compressors=PRESETS["text"].zarr_compressors(np.uint8),
                                  zarr_format=3)
        if data.size:
            array.with_config(_WRITE_CONFIG)[:] = data
        keys[name] = key
    return keys


def read_side_file(root: str, key: str, name: str) -> bytes:
    try:
        return zarr.open_array(store=root, path=key, mode="r")[:].tobytes()
    except Exception as exc:
        raise CorruptChunkError(f"side file '{name}' in file '{os.path.join(root, key)}': "
                                f"corrupt artifact chunk ({exc.__class__.__name__})") from None


def write_root_attrs(root: str, attrs: dict[str, Any]) -> None:
    group = zarr.open_group(store=root, mode="a", zarr_format=3)
    group.attrs.update(attrs)


def read_root_attrs(root: str) -> dict[str, Any]:
    if not os.path.exists(root):
        raise ArtifactError(f"file '{root}': no such file or folder")
    if not os.path.isfile(os.path.join(root, "zarr.json")):
        raise ArtifactError(f"file '{root}': not a deltastream artifact (no zarr.json)")
    try:
        return dict(zarr.open_group(store=root, mode="r", zarr_format=3).attrs)
    except Exception as exc:
        raise ArtifactError(f"file '{root}': not a readable zarr v3 group ({exc})") from None


def stored_bytes(root: str, key: str) -> int:
    """Bytes on disk under one key (metadata included)."""
    total = 0
    for folder, _, files in os.walk(os.path.join(root, key)):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total
