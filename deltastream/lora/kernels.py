"""The LoRA delta of a block of rows, fused (numba): ``out[i, c] = sum_j left[i, j] right[j, c]``
in float32, j in order, each product rounded to float32 and then added (no FMA, no reassociation):
the numpy definition ``acc += left[:, j:j+1] * right[j:j+1]`` for j = 0..r-1, bit for bit, in one
pass over the output instead of 2r (tests/test_lora.py checks it against that definition)."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["lora_rows"]

_jit = numba.njit(nogil=True, cache=True, boundscheck=False)


@_jit
def _rows(left, right, scale, out):  # pragma: no cover - compiled
    n, rank = left.shape
    k = right.shape[1]
    for i in range(n):
        for c in range(k):
            out[i, c] = np.float32(0.0)
        for j in range(rank):
            lj = left[i, j]
            for c in range(k):
                out[i, c] = out[i, c] + lj * right[j, c]
        for c in range(k):
            out[i, c] = out[i, c] * scale


def lora_rows(left: np.ndarray, right: np.ndarray, scale: float) -> np.ndarray:
    """(n x r) @ (r x k) * scale in float32, the rank summed in order (the same bits for any n)."""
    left = np.ascontiguousarray(left, np.float32)
    right = np.ascontiguousarray(right, np.float32)
    out = np.empty((left.shape[0], right.shape[1]), np.float32)
    _rows(left, right, np.float32(scale), out)
    return out
