"""One merge task: elements [start, stop) of one output tensor, from every model's chunk.

The base chunk is read once for all models; each model's chunk is read (from a checkpoint or
decoded from an artifact: a chunk source either way), sparsified and combined; the result is
written in place in the output shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checkpoint.writer import write_at
from ..dtypes import DTYPES, from_float32, to_float32
from ..exact import NonFinite
from ..methods.base import ChunkContext, LossyMethod, non_finite_error
from ..ranks import slices
from ..sources import Source
from .methods import MergeSpec, combine, linear

__all__ = ["ModelPart", "MergeTask", "merge_chunk"]


@dataclass(frozen=True)
class ModelPart:
    source: Source  # the model's tensor, cropped to the base's rows
    weight: float
    method: LossyMethod | None
    ctx: ChunkContext | None


@dataclass(frozen=True)
class MergeTask:
    name: str
    base: Source
    start: int
    stop: int
    parts: tuple[ModelPart, ...]
    spec: MergeSpec | None  # None: copied from the base (not a float tensor)
    linear: bool
    normalize: bool
    lam: float
    official: bool
    out_dtype: str
    out_path: str
    out_offset: int

    @property
    def nbytes(self) -> int:
        """The input bytes the task reads (progress)."""
        return (len(self.parts) + 1) * (self.stop - self.start) * self.base.dtype.itemsize


def _f32(source: Source, start: int, stop: int) -> np.ndarray:
    return to_float32(source.read(start, stop), source.dtype, out=np.empty(stop - start, np.float32))


def merge_chunk(task: MergeTask) -> None:
    s, e = task.start, task.stop
    if task.spec is None:
        out = task.base.read(s, e)
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite values are carried element-wise
            out = _merged_bits(task, s, e)
    write_at(task.out_path, task.out_offset + s * out.itemsize, out, task.name)


def _sparsified(part: ModelPart, base: np.ndarray, task: MergeTask, s: int, e: int) -> np.ndarray:
    delta = _f32(part.source, s, e)
    delta -= base
    if part.method is None:
        return delta
    try:  # sparsifiers edit in place
        return part.method.edit_delta(delta, part.ctx)
    except NonFinite:
        raise non_finite_error(part.method, part.ctx, part.source, task.base, part.source.read(s, e),
                               task.base.read(s, e)) from None


def _merged_bits(task: MergeTask, s: int, e: int) -> np.ndarray:
    """The merged output of elements [s, e) of a float tensor, as the output dtype's bits."""
    weights = [p.weight for p in task.parts]
    if task.linear:
        merged = linear([_f32(p.source, s, e) for p in task.parts], weights, task.normalize)
    else:
        base = _f32(task.base, s, e)
        deltas = [_sparsified(part, base, task, s, e) for part in task.parts]
        # combined a slice at a time: the temporaries stay small and in cache
        for a, b in slices(e - s):
            base[a:b] = combine(base[a:b], [d[a:b] for d in deltas], weights, task.spec,
                                normalize=task.normalize, lam=task.lam, official=task.official)
        merged = base
    return from_float32(np.ascontiguousarray(merged, np.float32), DTYPES[task.out_dtype],
                        out=np.empty(e - s, DTYPES[task.out_dtype].bits))
