"""Exact sums of float32 magnitudes, the same for any chunking, order or worker count.

A mean magnitude (BitDelta's scale, DARE's L1 rescale, a block's mean) is a sum over a whole
tensor, but the tensor arrives in chunks, in any order, and a float sum depends on its order.
These sums do not: every |x| is cut at a fixed-point grid of 2^-56 into a high part (multiples
of 2^-20) and a low part, each summed in int64 with no rounding at all; partials then add as
Python integers, and the total is rounded to float once. The result is the sum of |x| truncated
to multiples of 2^-56 (1.4e-17): exact for every delta a checkpoint holds, and bit for bit the
same whether computed from 16 MiB chunks on 2 threads or 4 KiB chunks on a cluster. Values of
2^16 or more (never a fine-tuning delta) take a slower path by exponent buckets, exact too.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FixedSum", "magnitude_sum", "row_magnitude_sums", "total"]

HI_SHIFT, LO_SHIFT = 20, 56  # grid of the high part and of the whole
FixedSum = int  # a sum in units of 2^-56


_BLOCK = 1 << 15  # elements per step: the float64 temporaries stay in cache


def _split_sums(mag: np.ndarray, rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sums of the (high, low) int64 parts of |x| (float32, < 2^16), per row of ``rows`` equal
    rows, where |x| ~= high*2^-20 + low*2^-56 exactly up to the grid."""
    mag = mag.reshape(rows, -1)
    n = mag.shape[1]
    high_sum = np.zeros(rows, np.int64)
    low_sum = np.zeros(rows, np.int64)
    step = max(1, _BLOCK // n) if n < _BLOCK else 1
    width = min(n, _BLOCK)
    wide = np.empty((step, width), np.float64)
    high = np.empty((step, width), np.float64)
    ints = np.empty((step, width), np.int64)
    for r in range(0, rows, step):
        r1 = min(rows, r + step)
        for c in range(0, n, width):
            c1 = min(n, c + width)
            w, h, i = wide[: r1 - r, : c1 - c], high[: r1 - r, : c1 - c], ints[: r1 - r, : c1 - c]
            np.multiply(mag[r:r1, c:c1], 2.0 ** HI_SHIFT, out=w)
            np.floor(w, out=h)
            w -= h  # exact: the low bits of a 24-bit mantissa
            w *= 2.0 ** (LO_SHIFT - HI_SHIFT)
            np.floor(w, out=w)
            np.copyto(i, h, casting="unsafe")
            high_sum[r:r1] += i.sum(axis=1)
            np.copyto(i, w, casting="unsafe")
            low_sum[r:r1] += i.sum(axis=1)
    return high_sum, low_sum


def _slow_sum(mag: np.ndarray) -> FixedSum:
    """The same truncated sum for any float32: each mantissa is cut at the 2^-56 grid, then the
    cut mantissas are summed exactly per exponent."""
    bits = mag.view(np.uint32)
    exponent = (bits >> 23).astype(np.int64)
    if (exponent == 255).any():
        raise OverflowError("infinite or NaN magnitude")
    mantissa = ((bits & 0x7FFFFF) | ((exponent > 0).astype(np.uint32) << 23)).astype(np.int64)
    shift = np.maximum(exponent, 1) - 150 + LO_SHIFT  # value = mantissa * 2^(shift) grid units
    cut = np.where(shift < 0, mantissa >> np.minimum(-shift, 63), mantissa)
    per_exp = np.bincount(exponent, weights=cut, minlength=256).astype(np.int64).tolist()
    return sum(m << max(max(e, 1) - 150 + LO_SHIFT, 0) for e, m in enumerate(per_exp))


def magnitude_sum(values: np.ndarray, mask: np.ndarray | None = None) -> FixedSum:
    """Sum of |values| (float32) where mask (if given) is true, in units of 2^-56."""
    mag = np.abs(values)
    if mask is not None:  # unselected values count as zeros: no compaction of the chunk
        with np.errstate(invalid="ignore"):  # an unselected inf or NaN becomes NaN: handled below
            np.multiply(mag, mask, out=mag)
    if mag.size == 0:
        return 0
    if not float(mag.max()) < 2.0 ** 16:  # rare: huge, infinite or NaN values; only the selected count
        selected = np.abs(values)[mask] if mask is not None else mag
        return _slow_sum(np.ascontiguousarray(selected, dtype=np.float32))
    high, low = _split_sums(mag)
    return (int(high[0]) << (LO_SHIFT - HI_SHIFT)) + int(low[0])


def row_magnitude_sums(values: np.ndarray, row_len: int) -> list[FixedSum]:
    """The magnitude sum of each full row of a chunk (values.size % row_len == 0)."""
    mag = np.abs(values).reshape(-1, row_len)
    if mag.size and not float(mag.max()) < 2.0 ** 16:
        return [_slow_sum(np.ascontiguousarray(r, dtype=np.float32)) for r in mag]
    if mag.size == 0:
        return [0] * mag.shape[0]
    high, low = _split_sums(mag, mag.shape[0])
    return [(h << (LO_SHIFT - HI_SHIFT)) + lo for h, lo in zip(high.tolist(), low.tolist())]


def total(fixed: FixedSum) -> float:
    """A fixed-point sum as a float, rounded once."""
    return math.ldexp(float(fixed), -LO_SHIFT) if fixed < 2 ** 1000 else math.inf
