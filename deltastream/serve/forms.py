"""A tensor's delta in the form a serving bank keeps it in (numpy; ``deltastream.serve`` moves it to a device).

``Method.serving_form(chunks)`` turns one artifact tensor, read chunk by chunk, into one of these:

- :class:`DenseDelta`: the decoded float32 delta (the default: lossless, low rank, DARE-k...);
- :class:`SparseDelta`: flat indices and values of the entries a random drop kept (DARE);
- :class:`SignDelta`: packed sign planes, +-alpha per row and level, an optional packed non-zero
  mask (BitDelta, its residual levels and ``zero: keep``);
- :class:`CodebookDelta`: packed signs, packed code planes and a table of magnitudes (multibit).

Rows are the tensor's leading dimensions flattened, columns its last (a 1-D tensor is one row). A
packed row holds ``ceil(cols / 8)`` bytes in np.packbits' big bit order; the padding bits are 0.
``dense()`` is each form's reference decode: the float32 values ``decode_delta`` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..methods.base import ChunkContext

__all__ = ["ServingChunks", "ServingForm", "DenseDelta", "SparseDelta", "SignDelta", "CodebookDelta",
           "rows_cols", "packed_rows", "unpack_rows"]


class ServingChunks(Protocol):
    """One artifact tensor as the bank reads it: chunk by chunk, never whole."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def ranges(self) -> list[tuple[int, int]]: ...

    def context(self, index: int) -> ChunkContext: ...

    def stored(self, index: int) -> dict[str, np.ndarray]: ...

    def delta(self, index: int) -> np.ndarray:
        """float32 of the decoded chunk minus float32 of the base's (a fresh array)."""
        ...


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) >= 2:
        return math.prod(shape[:-1]), shape[-1]
    return 1, math.prod(shape)


@dataclass(frozen=True)
class DenseDelta:
    values: np.ndarray  # float32, the tensor's shape

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def dense(self) -> np.ndarray:
        return self.values


@dataclass(frozen=True)
class SparseDelta:
    shape: tuple[int, ...]
    index: np.ndarray  # int64, flat and increasing
    values: np.ndarray  # float32

    def dense(self) -> np.ndarray:
        out = np.zeros(math.prod(self.shape), np.float32)
        out[self.index] = self.values
        return out.reshape(self.shape)


@dataclass(frozen=True)
class SignDelta:
    """delta[r, c] = sum_j (+alphas[j, r] if bit c of planes[j][r] else -alphas[j, r]), times mask."""

    shape: tuple[int, ...]
    planes: tuple[np.ndarray, ...]  # uint8 [rows, ceil(cols/8)] each: one per level
    alphas: np.ndarray  # float32 [levels, rows]
    mask: np.ndarray | None = None  # uint8 [rows, ceil(cols/8)]: 1 where the delta is non-zero

    def dense(self) -> np.ndarray:
        rows, cols = rows_cols(self.shape)
        out = np.zeros((rows, cols), np.float32)
        for plane, alpha in zip(self.planes, self.alphas):
            a = alpha[:, None].astype(np.float32)
            out += np.where(unpack_rows(plane, cols), a, -a)
        if self.mask is not None:
            out[~unpack_rows(self.mask, cols)] = 0
        return out.reshape(self.shape)


@dataclass(frozen=True)
class CodebookDelta:
    """delta[r, c] = +-levels[code[r, c]], code = sum_p bit c of codes[p][r] << p."""

    shape: tuple[int, ...]
    signs: np.ndarray  # uint8 [rows, ceil(cols/8)]
    codes: tuple[np.ndarray, ...]  # uint8 [rows, ceil(cols/8)] each: bit p of the code
    levels: np.ndarray  # float32 [2^len(codes)]

    def dense(self) -> np.ndarray:
        rows, cols = rows_cols(self.shape)
        code = np.zeros((rows, cols), np.int64)
        for p, plane in enumerate(self.codes):
            code |= unpack_rows(plane, cols).astype(np.int64) << p
        out = self.levels[code]
        np.negative(out, out=out, where=~unpack_rows(self.signs, cols))
        return out.reshape(self.shape)


ServingForm = DenseDelta | SparseDelta | SignDelta | CodebookDelta


def unpack_rows(packed: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols]."""
    return np.unpackbits(packed, axis=1, count=cols).view(bool)


def packed_rows(chunks: ServingChunks, role: str, plane: int = 0) -> np.ndarray:
    """Plane ``plane`` of the packed array ``role`` (``planes`` planes per chunk, one after the
    other, as multibit's codes) as packed rows, read chunk by chunk. Chunks of whole rows of a
    multiple of 8 columns (the planner's chunks, on every real model) are copied byte for byte;
    others are unpacked and repacked."""
    rows, cols = rows_cols(chunks.shape)
    width = math.ceil(cols / 8)
    out = np.zeros((rows, width), np.uint8)
    flat = out.reshape(-1)
    for index, (start, stop) in enumerate(chunks.ranges()):
        n = stop - start
        chunk_bytes = math.ceil(n / 8)
        data = chunks.stored(index)[role][plane * chunk_bytes:(plane + 1) * chunk_bytes]
        if cols % 8 == 0 and start % 8 == 0:
            flat[start // 8:start // 8 + chunk_bytes] = data[:chunk_bytes]
            continue
        bits = np.unpackbits(data, count=n)
        r0, r1 = start // cols, (stop - 1) // cols + 1
        block = np.unpackbits(out[r0:r1], axis=1, count=cols).reshape(-1)
        block[start - r0 * cols:stop - r0 * cols] = bits
        out[r0:r1] = np.packbits(block.reshape(r1 - r0, cols), axis=1)
    return out
