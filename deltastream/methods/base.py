"""The contract every method follows, written once.

A method is a small class with a ``method_id``, a frozen dataclass of parameters, and pure
array functions: it imports numpy (and torch), never zarr, dask or files. An *encoding* method
turns one chunk of (base bits, fine-tune bits) into the arrays an artifact stores for that chunk,
and back. The engine guarantees: chunk i of a tensor's plan is chunk i of each stored array, and
``decode(base, encode(base, ft))`` is what ``apply`` writes.

Like a numcodecs codec, a method is plain data: ``get_config()`` is JSON with its id,
``from_config`` rebuilds it, and two methods are equal when their configs are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..dtypes import DType
from ..errors import ParameterError

__all__ = ["Method", "StoredArray"]


@dataclass(frozen=True)
class StoredArray:
    """One array an encoding stores per tensor: its role, dtype, length per plan chunk, codecs."""

    role: str
    dtype: np.dtype
    chunk_len: int  # elements of this array that one plan chunk produces (the last may be fewer)
    total_len: int
    compression: str  # a key of artifact.codecs.COMPRESSION


class Method:
    """Base class: subclasses set ``method_id`` and ``Params`` and implement the array functions."""

    method_id: ClassVar[str]
    Params: ClassVar[type]
    summary: ClassVar[str] = ""

    def __init__(self, params: Any = None, **kwargs: Any):
        if params is None:
            try:
                params = self.Params(**kwargs)
            except TypeError as exc:
                raise ParameterError(f"method '{self.method_id}': {exc}") from None
        self.params = params

    def get_config(self) -> dict[str, Any]:
        return {"id": self.method_id, **dataclasses.asdict(self.params)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Method:
        config = dict(config)
        config.pop("id", None)
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    # --- the encoding contract -------------------------------------------------------------
    def stored_arrays(self, dtype: DType, numel: int, chunk_elems: int) -> list[StoredArray]:
        """The arrays stored for one tensor of this dtype, size and chunking."""
        raise NotImplementedError

    def encode(self, base: np.ndarray, ft: np.ndarray, dtype: DType) -> dict[str, np.ndarray]:
        """One chunk: base and fine-tune bit patterns (base all zero for a new tensor) -> arrays."""
        raise NotImplementedError

    def decode(self, base: np.ndarray, stored: dict[str, np.ndarray], dtype: DType) -> np.ndarray:
        """One chunk: base bit patterns and the stored arrays -> the output's bit patterns."""
        raise NotImplementedError
