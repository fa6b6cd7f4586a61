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

import os
from typing import Any

import numpy as np
import zarr

from ..errors import ArtifactError, CorruptChunkError
from ..methods import StoredArray
from .codecs import codecs_for

__all__ = [
    "tensor_key", "create_arrays", "write_chunk", "read_chunk", "chunk_file",
    "write_side_files", "read_side_file", "write_root_attrs", "read_root_attrs", "stored_bytes",
]

_WRITE_CONFIG = {"write_empty_chunks": True}  # skip zarr's per-chunk fill-value comparison


def tensor_key(index: int) -> str:
    return f"tensors/{index:06d}"


def create_arrays(root: str, key: str, arrays: list[StoredArray]) -> None:
    """Create a tensor's arrays (metadata only; chunks are written by the tasks)."""
    for spec in arrays:
        zarr.create_array(
            store=root, name=f"{key}/{spec.role}", shape=(spec.total_len,),
            chunks=(max(1, spec.chunk_len),), dtype=spec.dtype, fill_value=0,
            compressors=codecs_for(spec.compression, spec.dtype), zarr_format=3,
        )


def _region(chunk_index: int, chunk_len: int, total_len: int) -> slice:
    start = chunk_index * chunk_len
    return slice(start, min(start + chunk_len, total_len))


def write_chunk(root: str, key: str, spec: StoredArray, chunk_index: int, data: np.ndarray) -> None:
    array = zarr.open_array(store=root, path=f"{key}/{spec.role}", mode="r+").with_config(_WRITE_CONFIG)
    array[_region(chunk_index, spec.chunk_len, spec.total_len)] = data


def chunk_file(root: str, key: str, role: str, chunk_index: int) -> str:
    """Where zarr keeps one chunk of a 1-D array with the default chunk key encoding."""
    return os.path.join(root, key, role, "c", str(chunk_index))


def read_chunk(root: str, key: str, spec: StoredArray, chunk_index: int, tensor: str) -> np.ndarray:
    """Decode one chunk; a failed checksum or decode names the tensor and the chunk file."""
    try:
        array = zarr.open_array(store=root, path=f"{key}/{spec.role}", mode="r")
        return array[_region(chunk_index, spec.chunk_len, spec.total_len)]
    except Exception as exc:  # zarr raises ValueError/RuntimeError from codecs; report it plainly
        raise CorruptChunkError(
            f"tensor '{tensor}' in file '{chunk_file(root, key, spec.role, chunk_index)}': "
            f"corrupt artifact chunk ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def write_side_files(root: str, side_files: dict[str, str]) -> dict[str, str]:
    """Store each side file as a zstd uint8 array; return name -> array key for the manifest."""
    keys = {}
    for i, (name, path) in enumerate(side_files.items()):
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
        key = f"sidefiles/{i:03d}"
        array = zarr.create_array(store=root, name=key, shape=data.shape, chunks=(max(1, data.size),),
                                  dtype=np.uint8, fill_value=0, compressors=codecs_for("zstd", np.uint8),
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
