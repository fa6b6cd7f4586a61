"""CRC-32C of array bytes: chunk fingerprints and checks.

The ``crc32c`` package: hardware-accelerated (~16 GB/s per core here, benchmarks/micro.py) and it
releases the GIL, so two workers checksum two chunks at once (google-crc32c, which zarr uses,
holds the GIL: with it, checksums and the page faults of reading the inputs ran one at a time).
"""

from __future__ import annotations

import hashlib
import json

import crc32c as _crc32c
import numpy as np

__all__ = ["crc32c", "digest"]


def crc32c(data: np.ndarray) -> int:
    if data.size == 0:
        return 0
    return _crc32c.crc32c(np.ascontiguousarray(data).reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # an ndarray is a buffer; numpy declares __buffer__ only for Python >= 3.12


def digest(obj: object) -> str:
    """A short stable hex digest of JSON-able data (e.g. all chunk CRCs of a base)."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]
