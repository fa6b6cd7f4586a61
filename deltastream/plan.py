"""The plan: which tensors are processed, how each is cut into chunks, and what each chunk does.

A plan is pure data, built and validated from checkpoint headers alone before any heavy I/O,
so a missing tensor or a shape mismatch fails in the first second. Each tensor is cut into
contiguous flat element ranges (so random streams can be addressed by element index) of at most
``chunk_bytes``; ranges are whole rows when a row fits, which row-wise methods rely on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .checkpoint import Checkpoint, TensorInfo
from .errors import MismatchError, tensor_context

__all__ = ["DEFAULT_CHUNK_BYTES", "TensorPlan", "Chunk", "chunk_elements", "chunk_ranges", "pair_tensors"]

#: 32 MiB per input chunk: large enough to stream near disk speed, small enough that
#: 2 workers x (2 inputs + output + codec buffers) stay far under a 1 GiB budget.
DEFAULT_CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the job: the fine-tune's tensor, the base's (None if new), its chunking."""

    name: str
    ft: TensorInfo
    base: TensorInfo | None
    chunk_elems: int

    @property
    def numel(self) -> int:
        return self.ft.numel

    @property
    def base_numel(self) -> int:
        """Elements the base has (fewer than the fine-tune's when its vocabulary grew; 0 if new)."""
        return self.base.numel if self.base is not None else 0

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.numel / self.chunk_elems))

    def chunks(self) -> list[Chunk]:
        return [Chunk(self.name, i, start, stop)
                for i, (start, stop) in enumerate(chunk_ranges(self.numel, self.chunk_elems))]


@dataclass(frozen=True)
class Chunk:
    """Elements [start, stop) of a tensor, the index-th chunk of it."""

    tensor: str
    index: int
    start: int
    stop: int


def chunk_elements(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> int:
    """Elements per chunk: at most chunk_bytes, whole rows when a row fits, and balanced.

    Balanced means the tensor is split into equal chunks (bar the rounding to rows) rather than
    full chunks plus a small remainder: zarr stores an edge chunk at full size, so a remainder
    would cost a nearly empty chunk's encode.
    """
    numel = math.prod(shape)
    limit = max(1, chunk_bytes // itemsize)
    if numel <= limit:
        return max(1, numel)
    row = shape[-1] if len(shape) >= 2 else 1
    unit = row if 0 < row <= limit else 1
    units = math.ceil(numel / unit)
    per_chunk = limit // unit
    n_chunks = math.ceil(units / per_chunk)
    return math.ceil(units / n_chunks) * unit


def chunk_ranges(numel: int, chunk_elems: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering numel elements; an empty tensor still has one empty chunk."""
    if numel == 0:
        return [(0, 0)]
    return [(s, min(s + chunk_elems, numel)) for s in range(0, numel, chunk_elems)]


def pair_tensors(base: Checkpoint, ft: Checkpoint, chunk_bytes: int) -> list[TensorPlan]:
    """Match every fine-tune tensor with the base's, in the fine-tune's order, or fail clearly.

    A tensor only in the fine-tune is kept whole (its base is None), as are the rows a fine-tune
    added to a vocabulary-sized first dimension; a tensor only in the base, or any other shape or
    dtype mismatch, is an error naming the file and tensor.
    """
    problems = []
    b: TensorInfo | None
    for name, b in base.tensors.items():
        if name not in ft.tensors:
            problems.append(f"{tensor_context(ft.path, name)}: missing from the fine-tune "
                            f"(present in the base, '{b.path}')")
    plans = []
    for name, f in ft.tensors.items():
        b = base.tensors.get(name)
        grown = b is not None and len(f.shape) >= 1 and f.shape[1:] == b.shape[1:] and f.shape[0] > b.shape[0]
        if b is not None and b.shape != f.shape and not grown:
            problems.append(f"{tensor_context(f.path, name)}: shape {f.shape} differs from the base's "
                            f"{b.shape} in '{b.path}'")
        elif b is not None and b.dtype != f.dtype:
            problems.append(f"{tensor_context(f.path, name)}: dtype {f.dtype.name} differs from the "
                            f"base's {b.dtype.name} in '{b.path}'")
        plans.append(TensorPlan(name=name, ft=f, base=b,
                                chunk_elems=chunk_elements(f.shape, f.dtype.itemsize, chunk_bytes)))
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise MismatchError(problems[0] + more)
    return plans
