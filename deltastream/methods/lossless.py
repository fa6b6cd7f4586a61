"""Lossless: the XOR of the fine-tune's and the base's bit patterns, byte-shuffled and compressed.

``stored = ft_bits ^ base_bits``, ``ft_bits = stored ^ base_bits``: exact for every dtype
(floats, ints, bool, fp8) with no rounding anywhere. A small delta leaves sign, exponent and
high mantissa bits equal, so the XOR is mostly zero bits in the high bit planes, which a
bit-shuffle then zstd packs tightly (docs/format.md has the measurements behind this choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dtypes import DType
from .base import Method, StoredArray

__all__ = ["Lossless"]


@dataclass(frozen=True)
class LosslessParams:
    pass


class Lossless(Method):
    method_id = "lossless"
    Params = LosslessParams
    summary = "bit-exact: XOR of bit patterns, bit-shuffled and zstd-compressed"

    def stored_arrays(self, dtype: DType, numel: int, chunk_elems: int) -> list[StoredArray]:
        return [StoredArray("xor", dtype.bits, chunk_elems, numel, "xor")]

    def encode(self, base: np.ndarray, ft: np.ndarray, dtype: DType) -> dict[str, np.ndarray]:
        return {"xor": np.bitwise_xor(ft, base)}

    def decode(self, base: np.ndarray, stored: dict[str, np.ndarray], dtype: DType) -> np.ndarray:
        out = stored["xor"]
        np.bitwise_xor(out, base, out=out)
        return out
