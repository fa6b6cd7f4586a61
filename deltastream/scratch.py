"""Per-thread scratch buffers, reused from chunk to chunk.

Filling a fresh chunk-sized buffer costs its page faults (3x slower than refilling a reused one
here: benchmarks/micro.py; glibc maps every large allocation anew) and makes private memory creep
as the allocator fragments (apply's peak rose over a run before the pool: benchmarks/README.md). A task that needs
a temporary array takes one from its thread's pool instead: the pool holds one buffer per tag, grown to the largest
chunk seen, so private memory is set by chunk size x workers and stays flat for the whole run.

A buffer is valid until the same thread asks for the same tag again: use it within one task.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["scratch"]

_local = threading.local()


def scratch(tag: str, n: int, dtype) -> np.ndarray:
    """A 1-D array of n elements of dtype (uninitialised), private to this thread and tag."""
    dtype = np.dtype(dtype)
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    nbytes = n * dtype.itemsize
    buf = pool.get(tag)
    if buf is None or buf.nbytes < nbytes:
        buf = pool[tag] = np.empty(max(nbytes, 1), np.uint8)
    return buf[:nbytes].view(dtype)
