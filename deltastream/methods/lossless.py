"""Lossless: the fine-tune's bit patterns as a small integer delta from the base's, compressed.

Two exact transforms, chosen by ``transform`` (docs/format.md has the measurements):

- ``sub`` (default): ``d = ft_bits - base_bits`` (mod 2^n), zigzagged (``(d << 1) ^ (d >> n-1)``
  on the signed value) so that small changes either way become small unsigned numbers. For a
  float, a change of a few ULPs with the same sign and exponent is a difference of a few units,
  so the high bytes are zero; a byte shuffle groups them and zstd packs them.
- ``xor``: ``ft_bits ^ base_bits``, bit-shuffled: equal high bits become zero bit planes.

Both are integer bijections, so the rebuild is bit-exact for every dtype (floats, ints, bool,
fp8) with no rounding anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..dtypes import DType
from ..params import field
from ..scratch import scratch
from .base import ChunkContext, Method, StoredArray

__all__ = ["Lossless", "zigzag", "unzigzag"]


def zigzag(d: np.ndarray) -> np.ndarray:
    """In place on an unsigned array holding two's-complement values: d -> zigzag(d)."""
    sign = scratch("zigzag", d.size, d.dtype)
    np.right_shift(d, np.array(d.dtype.itemsize * 8 - 1, d.dtype), out=sign)  # 1 where negative
    np.left_shift(d, np.array(1, d.dtype), out=d)
    np.negative(sign, out=sign)  # 0 or all ones
    np.bitwise_xor(d, sign, out=d)
    return d


def unzigzag(z: np.ndarray) -> np.ndarray:
    """In place: the inverse of :func:`zigzag`."""
    low = scratch("zigzag", z.size, z.dtype)
    np.bitwise_and(z, np.array(1, z.dtype), out=low)
    np.right_shift(z, np.array(1, z.dtype), out=z)
    np.negative(low, out=low)
    np.bitwise_xor(z, low, out=z)
    return z


@dataclass(frozen=True)
class LosslessParams:
    transform: str = field("sub", "sub: zigzag of the integer difference of bit patterns; xor: their XOR",
                           choices=("sub", "xor"))


class Lossless(Method):
    method_id = "lossless"
    Params = LosslessParams
    summary = "bit-exact: integer delta of bit patterns (or XOR), shuffled and zstd-compressed"
    lossy = False

    def stored_arrays(self, dtype: DType, shape: tuple[int, ...], chunk_elems: int,
                      state: dict) -> list[StoredArray]:
        role, preset = ("delta", "delta") if self.params.transform == "sub" else ("xor", "xor")
        return [StoredArray(role, dtype.bits, chunk_elems, math.prod(shape), preset)]

    def encode(self, base: np.ndarray, ft: np.ndarray, ctx: ChunkContext) -> dict[str, np.ndarray]:
        out = scratch("lossless", ft.size, ft.dtype)
        if self.params.transform == "xor":
            return {"xor": np.bitwise_xor(ft, base, out=out)}
        return {"delta": zigzag(np.subtract(ft, base, out=out))}  # unsigned: wraps mod 2^n

    def decode(self, base: np.ndarray, stored: dict[str, np.ndarray], ctx: ChunkContext) -> np.ndarray:
        if self.params.transform == "xor":
            out = stored["xor"]
            np.bitwise_xor(out, base, out=out)
            return out
        out = unzigzag(stored["delta"])
        np.add(out, base, out=out)
        return out
