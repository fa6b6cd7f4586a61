"""Exact sums of float32 magnitudes, the same for any chunking, order or worker count.

A mean magnitude (BitDelta's scale, DARE's L1 rescale, a block's mean) is a sum over a whole
tensor, but the tensor arrives in chunks, in any order, and a float sum depends on its order.
These sums do not: every |x| is cut at a fixed-point grid of 2^-56 into a high part (multiples
of 2^-20) and a low part, each summed in int64 with no rounding at all; partials then add as
Python integers, and the total is rounded to float once. The result is the sum of |x| truncated
to multiples of 2^-56 (1.4e-17): exact for every delta a checkpoint holds, and bit for bit the
same whether computed from 16 MiB chunks on 2 threads or 4 KiB chunks on a cluster. The parts
are taken from the float32 bit patterns with integer shifts in one fused pass (kernels.py). Values of
2^16 or more (never a fine-tuning delta) take a slower path by exponent buckets, exact too.
A NaN or an infinity has no sum: it raises :class:`NonFinite`, found on that slow path only, and
the job running the chunk turns it into a one-line error naming the tensor, file and element.
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels

__all__ = ["FixedSum", "NonFinite", "from_parts", "magnitude_sum", "row_magnitude_sums", "total"]

HI_SHIFT, LO_SHIFT = 20, 56  # grid of the high part and of the whole
FixedSum = int  # a sum in units of 2^-56
_NO_MASK = np.zeros(1, bool)


class NonFinite(OverflowError):
    """A whole-tensor figure met a NaN or an infinity. Raised inside a chunk task by the code that
    computes figures (sums, rank histograms, products), which knows no file; the task's job
    locates the element and raises ``methods.base.NonFiniteDelta`` (``non_finite_error``)."""


def _slow_sum(mag: np.ndarray) -> FixedSum:
    """The same truncated sum for any float32: each mantissa is cut at the 2^-56 grid, then the
    cut mantissas are summed exactly per exponent."""
    bits = mag.view(np.uint32)
    exponent = (bits >> 23).astype(np.int64)
    if (exponent == 255).any():
        raise NonFinite("a NaN or infinite magnitude")
    mantissa = ((bits & 0x7FFFFF) | ((exponent > 0).astype(np.uint32) << 23)).astype(np.int64)
    shift = np.maximum(exponent, 1) - 150 + LO_SHIFT  # value = mantissa * 2^(shift) grid units
    cut = np.where(shift < 0, mantissa >> np.minimum(-shift, 63), mantissa)
    per_exp = np.bincount(exponent, weights=cut, minlength=256).astype(np.int64).tolist()
    return sum(m << max(max(e, 1) - 150 + LO_SHIFT, 0) for e, m in enumerate(per_exp))


def from_parts(high: int, low: int) -> FixedSum:
    """The fixed-point sum that the kernels' (high, low) parts stand for."""
    return (int(high) << (LO_SHIFT - HI_SHIFT)) + int(low)


def magnitude_sum(values: np.ndarray, mask: np.ndarray | None = None) -> FixedSum:
    """Sum of |values| (float32) where mask (if given) is true, in units of 2^-56."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = values.view(np.uint32)
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    fixed, big = 0, 0
    for s in range(0, bits.size, kernels.SEGMENT):
        part = slice(s, s + kernels.SEGMENT)
        high, low, n_big = kernels.split_sums(bits[part], mask[part] if mask is not None else _NO_MASK,
                                              mask is not None)
        fixed += from_parts(high, low)
        big += n_big
    if big:  # rare: huge, infinite or NaN values; only the selected count
        return _slow_sum(np.abs(values if mask is None else values[mask]))
    return fixed


def row_magnitude_sums(values: np.ndarray, row_len: int) -> list[FixedSum]:
    """The magnitude sum of each full row of a chunk (values.size % row_len == 0)."""
    rows = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, row_len)
    high = np.empty(rows.shape[0], np.int64)
    low = np.empty(rows.shape[0], np.int64)
    if row_len <= kernels.SEGMENT and not kernels.row_split_sums(rows.view(np.uint32), high, low):
        return [from_parts(h, lo) for h, lo in zip(high.tolist(), low.tolist())]
    return [magnitude_sum(r) for r in rows]


def total(fixed: FixedSum) -> float:
    """A fixed-point sum as a float, rounded once."""
    return math.ldexp(float(fixed), -LO_SHIFT) if fixed < 2 ** 1000 else math.inf
