"""The bank's CPU kernels (numba) on packed sign bits: a lookup-table GEMV and a fused switch.

:func:`sign_gemv` computes ``out[t, r] = sum_c x[t, c] * s[r, c]`` with ``s = +1`` where bit c of
row r is set and ``-1`` where not, reading the packed bits directly (T-MAC / bitnet.cpp style):
for each token and each group of 8 input features it first tabulates the 256 signed sums the
group can contribute, then every packed byte of the weight is one table lookup and one add. The
weight is read at 1 bit per element and never unpacked; the tables (``cols / 8 * 256`` floats a
token) stay in cache.

:func:`sign_add_f32` and :func:`sign_add_bf16` are ``bank.use``'s switch for BitDelta: the
working copy ``round(f32(base) + (0 + sum_j +-alpha_j))`` in one pass, the arithmetic of BitDelta's
decode (``add_signed`` onto zeros, then ``output_bits``), so the switched weights are those
``apply`` writes, bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels import _as_f32, _round_bf16

__all__ = ["sign_gemv", "sign_add_f32", "sign_add_bf16"]

# serial: numba's parallel loops beside torch's OpenMP threads ran 20-300x slower here (thread
# contention: 8.6 ms for a table built in 0.03 ms serially); the bank runs one product at a time
_pjit = numba.njit(nogil=True, cache=True, boundscheck=False)


@_pjit
def _tables(x, tables):
    """tables[t, g, b] = sum_k x[t, 8g + k] * (+1 if bit 7-k of b else -1)."""
    n, groups = tables.shape[0], tables.shape[1]
    for tg in range(n * groups):
        t, g = tg // groups, tg % groups
        row = tables[t, g]
        total = np.float32(0)
        for k in range(8):
            total += x[t, 8 * g + k]
        row[0] = -total
        for b in range(1, 256):
            j = 0  # the lowest set bit of b, 2^j: b's sum is that of b without it, plus 2 x its column's input
            while not (b >> j) & 1:
                j += 1
            row[b] = row[b ^ (1 << j)] + np.float32(2) * x[t, 8 * g + 7 - j]


@_pjit
def _lookup(tables, packed, out):
    n, groups = tables.shape[0], tables.shape[1]
    rows = packed.shape[0]
    for r in range(rows):
        line = packed[r]
        for t in range(n):
            table = tables[t]
            acc = np.float32(0)
            for g in range(groups):
                acc += table[g, line[g]]
            out[t, r] = acc


def sign_gemv(x: np.ndarray, packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x float32 [n, cols] (contiguous), packed uint8 [rows, ceil(cols/8)] -> float32 [n, rows]."""
    n, cols = x.shape
    groups = packed.shape[1]
    if cols != groups * 8:  # padding columns: their bits are 0, their inputs must be too
        padded = np.zeros((n, groups * 8), np.float32)
        padded[:, :cols] = x
        x = padded
    tables = np.empty((n, groups, 256), np.float32)
    _tables(np.ascontiguousarray(x, np.float32), tables)
    if out is None:
        out = np.empty((n, packed.shape[0]), np.float32)
    _lookup(tables, np.ascontiguousarray(packed), out)
    return out


@_pjit
def sign_add_f32(weight, planes, alphas, out):
    """out[r, c] = f32(weight[r, c]) + (0 + sum_j +-alphas[j, r]) by bit c of planes[j, r]."""
    rows, cols = weight.shape
    levels = planes.shape[0]
    for r in range(rows):
        for c in range(cols):
            edited = np.float32(0)
            for j in range(levels):
                a = alphas[j, r]
                edited += a if (planes[j, r, c >> 3] >> (7 - (c & 7))) & 1 else -a
            out[r, c] = edited + weight[r, c]


@_pjit
def sign_add_bf16(weight, planes, alphas, out):
    """As sign_add_f32 on bf16 bit patterns (uint16), rounded to nearest even."""
    rows, cols = weight.shape
    levels = planes.shape[0]
    for r in range(rows):
        for g in range((cols + 7) // 8):
            for k in range(min(8, cols - 8 * g)):
                c = 8 * g + k
                edited = np.float32(0)
                for j in range(levels):
                    a = alphas[j, r]
                    edited += a if (planes[j, r, g] >> (7 - k)) & 1 else -a
                out[r, c] = _round_bf16(edited + _as_f32(np.uint32(weight[r, c]) << np.uint32(16)))
