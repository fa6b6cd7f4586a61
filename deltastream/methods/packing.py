"""Bit planes, packed 8 to a byte (np.packbits, big bit order), one chunk at a time.

A chunk of n elements packs a plane into ceil(n/8) bytes; the last chunk of a tensor may be
shorter, so a packed array's total length is (chunks - 1) full chunks plus the last one's bytes.
"""

from __future__ import annotations

import math

import numpy as np

from .base import StoredArray

__all__ = ["packed_array", "pack", "unpack"]


def packed_array(role: str, chunk_elems: int, numel: int, planes: int = 1, compression: str = "raw") -> StoredArray:
    """The StoredArray of ``planes`` packed bit planes per chunk."""
    full = planes * math.ceil(chunk_elems / 8)
    if numel == 0:
        return StoredArray(role, np.dtype(np.uint8), max(1, full), 0, compression)
    chunks = math.ceil(numel / chunk_elems)
    last = numel - (chunks - 1) * chunk_elems
    return StoredArray(role, np.dtype(np.uint8), full, (chunks - 1) * full + planes * math.ceil(last / 8), compression)


def pack(bits: np.ndarray) -> np.ndarray:
    """bool[n] -> uint8[ceil(n/8)]."""
    return np.packbits(bits)


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 -> bool[n] (the first n bits)."""
    return np.unpackbits(packed[: math.ceil(n / 8)], count=n).view(bool)
