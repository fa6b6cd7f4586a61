"""BitDelta's fused CPU kernels (numba), registered as its "numba" implementations (bitdelta.py).

* :func:`bf16_delta_signs` - BitDelta's encode on BF16: the delta and its packed signs;
* :func:`add_signed` - BitDelta's decode: one level of +-alpha from packed signs;
* :func:`bitdelta_bf16_output` - 1-bit BitDelta's whole output of a BF16 chunk.

Each gives the bits of the numpy definition it replaces (tests/test_kernels.py).
"""

from __future__ import annotations

import numpy as np

from ..kernels import _as_f32, _jit, _round_bf16

__all__ = ["bf16_delta_signs", "add_signed", "bitdelta_bf16_output"]


@_jit
def bf16_delta_signs(base, ft, delta, packed):
    """BitDelta's 1-bit encode of a BF16 chunk in one pass: delta = f32(ft) - f32(base) (float32)
    and packed[j] bit 7-b = (delta[8j + b] >= 0), big bit order as np.packbits (NaN packs 0, as
    numpy's ``NaN >= 0``). The magnitude sum is a second kernel (split_sums): fused into this
    loop it kept the loop from vectorizing and ran slower."""
    n = ft.size
    for j in range((n + 7) // 8):
        byte = np.uint32(0)
        for b in range(min(8, n - 8 * j)):
            i = 8 * j + b
            d = _as_f32(np.uint32(ft[i]) << np.uint32(16)) - _as_f32(np.uint32(base[i]) << np.uint32(16))
            delta[i] = d
            byte |= np.uint32(d >= 0) << np.uint32(7 - b)
        packed[j] = byte


@_jit
def add_signed(packed, alpha, per_element, edited):
    """edited[i] += +alpha or -alpha by the packed sign bit i (alpha[i] if per_element, else
    alpha[0]): one BitDelta level, decoded."""
    for i in range(edited.size):
        a = alpha[i] if per_element else alpha[0]
        bit = (packed[i >> 3] >> (7 - (i & 7))) & 1
        edited[i] = edited[i] + (a if bit else -a)


@_jit
def bitdelta_bf16_output(base, packed, alpha, out):
    """1-bit BitDelta's output of a BF16 chunk in one pass: round((0 + (+-alpha)) + f32(base)) by
    the packed sign bits, as add_signed onto zeros and bf16_add_round do it."""
    zero = np.float32(0)
    n = base.size
    for j in range((n + 7) // 8):
        byte = packed[j]
        for b in range(min(8, n - 8 * j)):
            i = 8 * j + b
            edited = zero + (alpha if (byte >> (7 - b)) & 1 else -alpha)
            out[i] = _round_bf16(edited + _as_f32(np.uint32(base[i]) << np.uint32(16)))
