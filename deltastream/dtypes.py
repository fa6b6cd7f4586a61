"""The safetensors dtypes, and how deltastream holds each of them in numpy.

Every dtype is read as its raw bit pattern (an unsigned integer of the same width) so that
lossless paths never round; float dtypes that numpy can compute in (F64, F32, F16, and BF16
widened through its bits) also have a float view for the lossy methods: they are ``computable``.
Every other dtype (fp8, complex, integers, bool) is only ever copied or stored exact: the policy
keeps it exact, merges refuse or copy it, and no encoder sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels

__all__ = ["DType", "DTYPES", "COMPUTABLE", "COMPUTABLE_NAMES", "dtype_by_name", "to_float32", "from_float32"]


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name, width, and how numpy sees it."""

    name: str
    itemsize: int
    kind: str  # "float", "int", "uint", "bool", "complex"
    numpy: str | None = None  # numpy dtype computing in it directly, if any

    @property
    def bits(self) -> np.dtype:
        """The unsigned integer dtype that holds the bit pattern of one element."""
        return np.dtype(f"<u{self.itemsize}")

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def computable(self) -> bool:
        """Whether a lossy method can compute on it: it has a float32 view (F64 rounds into it)."""
        return self.is_float and (self.numpy is not None or self.name == "BF16")


_TABLE = [
    DType("F64", 8, "float", "<f8"),
    DType("F32", 4, "float", "<f4"),
    DType("F16", 2, "float", "<f2"),
    DType("BF16", 2, "float"),
    DType("F8_E4M3", 1, "float"),
    DType("F8_E4M3FNUZ", 1, "float"),
    DType("F8_E5M2", 1, "float"),
    DType("F8_E5M2FNUZ", 1, "float"),
    DType("F8_E8M0", 1, "float"),
    DType("C64", 8, "complex", "<c8"),
    DType("I64", 8, "int", "<i8"),
    DType("I32", 4, "int", "<i4"),
    DType("I16", 2, "int", "<i2"),
    DType("I8", 1, "int", "<i1"),
    DType("U64", 8, "uint", "<u8"),
    DType("U32", 4, "uint", "<u4"),
    DType("U16", 2, "uint", "<u2"),
    DType("U8", 1, "uint", "<u1"),
    DType("BOOL", 1, "bool", "|b1"),
]

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
#: the dtypes lossy methods compute on (by name), and the same for messages
COMPUTABLE_NAMES = tuple(d.name for d in _TABLE if d.computable)
COMPUTABLE = ", ".join(COMPUTABLE_NAMES)


def dtype_by_name(name: str) -> DType | None:
    """The DType for a safetensors dtype string, or None if deltastream does not know it."""
    return DTYPES.get(name)


def to_float32(bits: np.ndarray, dtype: DType, out: np.ndarray | None = None) -> np.ndarray:
    """Widen a chunk given as bit patterns to float32 (exact for BF16, F16; rounds F64)."""
    if dtype.name == "BF16":
        if out is None:
            out = np.empty(bits.shape, np.float32)
        np.left_shift(bits, 16, out=out.view(np.uint32), casting="unsafe", dtype=np.uint32)
        return out
    if not dtype.computable or dtype.numpy is None:  # computable and not BF16: numpy computes in it
        raise TypeError(f"dtype {dtype.name} has no float32 view")
    values = bits.view(dtype.numpy)
    if out is None:
        return values.astype(np.float32)
    out[...] = values
    return out


def from_float32(values: np.ndarray, dtype: DType, out: np.ndarray | None = None) -> np.ndarray:
    """Round float32 values to a float dtype's bit patterns, to nearest even (as torch does)."""
    if dtype.name == "BF16":  # NaN stays NaN: rounding could carry its payload into infinity
        if out is None:
            out = np.empty(values.shape, np.uint16)
        kernels.bf16_round(np.ascontiguousarray(values, np.float32).reshape(-1), out.reshape(-1))
        return out
    if not dtype.computable or dtype.numpy is None:  # computable and not BF16: numpy computes in it
        raise TypeError(f"dtype {dtype.name} has no float32 rounding")
    if out is None:
        return values.astype(dtype.numpy).view(dtype.bits)
    out.view(dtype.numpy)[...] = values
    return out

