"""An array's layout (dtype, chunk length, length, codec chain) as its zarr.json records it.

The reader takes each array's layout from what the artifact records and compares it with what
the method of this version plans. A method whose layout changed (another chunk length, another
codec preset) then fails loudly on artifacts written before the change, saying what differs,
instead of misreading them; corruption of a recorded field is reported the same way.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import numpy as np
import zarr

from ..methods import StoredArray
from .codecs import PRESETS

__all__ = ["LAYOUT_FIELDS", "array_meta", "recorded_layout", "layout_difference"]

#: the zarr metadata fields that say how an array's bytes are laid out and encoded
LAYOUT_FIELDS = ("zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                 "fill_value", "codecs", "storage_transformers")
#: the element types a stored array can have (zarr v3 data_type names)
_DATA_TYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")


@functools.cache
def _array_template(dtype: str, preset: str) -> dict:
    """zarr's own metadata for a 1-D array of this dtype and codec chain (shape to be filled)."""
    store = zarr.storage.MemoryStore()
    zarr.create_array(store=store, shape=(1,), chunks=(1,), dtype=np.dtype(dtype), fill_value=0,
                      compressors=PRESETS[preset].zarr_compressors(np.dtype(dtype)), zarr_format=3)
    return json.loads(store._store_dict["zarr.json"].to_bytes())


def array_meta(spec: StoredArray, attributes: dict | None = None) -> dict:
    """The zarr.json of one planned array: zarr's metadata, made once per dtype and codec chain
    by zarr itself, given this array's shape (creating arrays through zarr's API took a second
    of a small job's time)."""
    meta = copy.deepcopy(_array_template(np.dtype(spec.dtype).str, spec.compression))
    meta["shape"] = [spec.total_len]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [max(1, spec.chunk_len)]
    meta["attributes"] = attributes or {}
    return meta


def _length(value: Any, what: str, low: int) -> int:
    if not (isinstance(value, list) and len(value) == 1 and type(value[0]) is int and low <= value[0] < 2**63):
        raise ValueError(f"its {what} is {json.dumps(value)[:80]}, not [n] with n >= {low}")
    return value[0]


def _without_typesize(codecs: Any) -> Any:
    if not isinstance(codecs, list):
        return codecs
    return [{**c, "configuration": {k: v for k, v in c["configuration"].items() if k != "typesize"}}
            if isinstance(c, dict) and isinstance(c.get("configuration"), dict) else c for c in codecs]


def recorded_layout(meta: Any, role: str) -> StoredArray:
    """The layout a zarr.json records, as a StoredArray of ``role``; ValueError saying why the
    metadata is not a 1-D regular array of one of the codec presets."""
    if not isinstance(meta, dict):
        raise ValueError("it is not a JSON object")
    total = _length(meta.get("shape"), "shape", 0)
    grid = meta.get("chunk_grid")
    config = grid.get("configuration") if isinstance(grid, dict) and grid.get("name") == "regular" else None
    chunk = _length(config.get("chunk_shape") if isinstance(config, dict) else None, "chunk shape", 1)
    if meta.get("data_type") not in _DATA_TYPES:
        raise ValueError(f"its data_type {json.dumps(meta.get('data_type'))[:40]} is not one an artifact stores")
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    codecs = _without_typesize(meta.get("codecs"))  # checked with the other fields, once the dtype is known
    presets = [name for name in PRESETS if _without_typesize(_array_template(dtype.str, name)["codecs"]) == codecs]
    if not presets:
        raise ValueError(f"its codec chain {json.dumps(meta.get('codecs'))[:200]} is none of the presets")
    return StoredArray(role, dtype, chunk, total, presets[0])


def layout_difference(recorded: StoredArray, planned: StoredArray) -> str | None:
    """What differs between the recorded layout and the plan, in words (None: nothing)."""
    for what, got, want in (("dtype", np.dtype(recorded.dtype).str, np.dtype(planned.dtype).str),
                            ("chunk length", recorded.chunk_len, max(1, planned.chunk_len)),
                            ("length", recorded.total_len, planned.total_len),
                            ("codec preset", recorded.compression, planned.compression)):
        if got != want:
            return f"it records {what} {got} where this version's method plans {want}"
    return None
