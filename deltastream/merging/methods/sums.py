"""Exact sums of products of float32 values (norms, dot products), per tensor or per vector.

The streamed merge methods need whole-tensor (or whole-row) figures: ``sum(a * b)`` over a
tensor that arrives in chunks, in any order. As for ``deltastream.exact``'s magnitude sums, the
result must not depend on the chunking: every product ``a * b`` (exact in float64: two 24-bit
mantissas) is cut at a fixed grid of 2^-92 into three parts (multiples of 2^-20, 2^-56, 2^-92),
each at most 2^36, summed with its sign in int64 with no rounding at all; partials add as integers.
The total is the sum of the products truncated toward zero to multiples of 2^-92 (2e-28), the same
bits whether a tensor came in one chunk or in a million. Products of 2^16 or more (never a
weight's or a delta's square) are summed exactly by a slower path (Python integers); a NaN or an
infinity raises :class:`~deltastream.exact.NonFinite`.

Figures are grouped by :class:`Vectors`: the element at flat index ``i`` belongs to vector
``(i // div) % count``: one vector (the whole tensor), the rows (``div`` = the last dimension) or
the vectors along the first dimension (``div`` = 1, ``count`` = the other dimensions' product).
A whole-tensor partial is a Python int; a per-vector partial is a dict of int64 arrays, which
``methods.base.combine_partials`` adds (exact: a vector has fewer than 2^26 elements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ...exact import NonFinite

__all__ = ["Vectors", "WHOLE", "vectors_of", "product_sum", "value", "MAX_VECTOR"]

GRID = 92  # the grid: 2^-92
_BIG = 65536.0  # products at or above this take the exact slow path
MAX_VECTOR = 1 << 26  # elements of one vector: its int64 part sums stay below 2^62


@dataclass(frozen=True)
class Vectors:
    """How a tensor splits into vectors: flat index i -> vector (i // div) % count."""

    div: int
    count: int

    def of(self, start: int, stop: int) -> np.ndarray:
        """The vector of each element of [start, stop)."""
        return (np.arange(start, stop, dtype=np.int64) // self.div) % self.count


WHOLE = Vectors(1 << 62, 1)


def vectors_of(shape: tuple[int, ...], along: str) -> Vectors:
    """``whole``; ``rows`` (vectors along the last dimension, mergekit's ``dim=-1``); or ``first``
    (vectors along the first dimension, ``dim=0``). A tensor of one dimension is one vector."""
    numel = math.prod(shape)
    if along == "whole" or len(shape) <= 1 or numel == 0:
        return WHOLE
    if along == "rows":
        vectors = Vectors(shape[-1], numel // shape[-1])
        size = shape[-1]
    elif along == "first":
        vectors = Vectors(1, numel // shape[0])
        size = shape[0]
    else:
        raise ValueError(f"vectors along {along!r}")
    if size > MAX_VECTOR:
        raise ValueError(f"vectors of {size} elements: more than {MAX_VECTOR}")
    return vectors


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _sums(x, y, start, div, count, high, mid, low):
    """Signed (high, mid, low) grid parts of x[i] * y[i], into the element's vector; returns the
    number of products left to the slow path (|p| >= 2^16, inf or NaN). Elements go by runs of
    one vector (a whole chunk, a row), summed in registers: no division per element."""
    big = 0
    n = x.size
    i = 0
    while i < n:
        flat = start + i
        run = min(n - i, div - flat % div)
        h_sum, m_sum, l_sum, big_run = _run_sums(x, y, i, i + run)
        g = (flat // div) % count
        high[g] += h_sum
        mid[g] += m_sum
        low[g] += l_sum
        big += big_run
        i += run
    return big


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _run_sums(x, y, lo, hi):
    two20 = 1048576.0
    two36 = 68719476736.0
    h_sum = np.int64(0)
    m_sum = np.int64(0)
    l_sum = np.int64(0)
    big = 0
    for i in range(lo, hi):
        p = np.float64(x[i]) * np.float64(y[i])
        a = abs(p)
        if not a < _BIG:
            big += 1
            continue
        s = a * two20
        h = math.floor(s)
        r = (s - h) * two36
        m = math.floor(r)
        part = math.floor((r - m) * two36)
        sign = np.int64(-1) if p < 0 else np.int64(1)
        h_sum += sign * np.int64(h)
        m_sum += sign * np.int64(m)
        l_sum += sign * np.int64(part)
    return h_sum, m_sum, l_sum, big


def product_sum(x: np.ndarray, y: np.ndarray, start: int = 0, vectors: Vectors = WHOLE):
    """The partial of sum(x * y) over a chunk starting at flat index ``start``: a Python int in
    units of 2^-92 (one vector) or {"high", "mid", "low": int64 arrays, "big": {vector: int}}."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    y = np.ascontiguousarray(y, np.float32).reshape(-1)
    n = vectors.count
    high, mid, low = (np.zeros(n, np.int64) for _ in range(3))
    big_count = _sums(x, y, np.int64(start), np.int64(vectors.div), np.int64(n), high, mid, low)
    big: dict[str, int] = {}
    if big_count:
        p = x.astype(np.float64) * y.astype(np.float64)
        where = np.flatnonzero(~(np.abs(p) < _BIG))
        if not np.isfinite(p[where]).all():
            raise NonFinite("a NaN or infinite value has no sum")
        groups = vectors.of(start, start + x.size)[where]
        for g, v in zip(groups.tolist(), p[where].tolist()):
            big[str(g)] = big.get(str(g), 0) + int(v * 2.0**GRID)  # exact: |v| >= 2^16 has no bits below 2^-31
    if n == 1:
        return (int(high[0]) << 72) + (int(mid[0]) << 36) + int(low[0]) + sum(big.values())
    return {"high": high, "mid": mid, "low": low, "big": big}


def value(partial) -> float | np.ndarray:
    """A combined partial as float64 (one rounding for a whole-tensor sum; a fixed formula of
    the exact integer parts per vector)."""
    if isinstance(partial, int):
        return math.ldexp(float(partial), -GRID)  # a float32 product sum is far below 2^1024
    out = (partial["high"].astype(np.float64) * 2.0**-20 + partial["mid"].astype(np.float64) * 2.0**-56
           + partial["low"].astype(np.float64) * 2.0**-92)
    for g, v in partial.get("big", {}).items():
        out[int(g)] += math.ldexp(float(v), -GRID)
    return out
