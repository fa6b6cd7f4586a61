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
from ..methods.base import non_finite_error
from ..ranks import slices
from ..sources import Source
from .methods import MergeSpec, combine, linear
from .passes import SparsifierJob

__all__ = ["ModelPart", "MergeInputs", "MergeTask", "merge_chunk"]


@dataclass(frozen=True)
class ModelPart:
    source: Source  # the model's tensor, cropped to the base's rows
    weight: float
    job: SparsifierJob | None  # its sparsifier: method, state and the passes' chunking; None: kept whole


@dataclass(frozen=True)
class MergeInputs:
    """What every chunk task of one tensor reads: the base and each model's part. It is a node
    of the graph that the tasks refer to, sent to a worker once (an artifact model's source
    carries its state: lowrank's factors are megabytes)."""

    base: Source
    parts: tuple[ModelPart, ...]


@dataclass(frozen=True)
class MergeTask:
    name: str
    inputs: int  # which of the graph's shared MergeInputs is its tensor's
    index: int  # the chunk, in the sparsifiers' chunking
    start: int
    stop: int
    nbytes: int  # the input bytes the task reads (progress)
    spec: MergeSpec | None  # None: copied from the base (not a float tensor)
    linear: bool
    normalize: bool
    lam: float
    official: bool
    seed: int
    out_dtype: str
    out_path: str
    out_offset: int


def _f32(source: Source, start: int, stop: int) -> np.ndarray:
    return to_float32(source.read(start, stop), source.dtype, out=np.empty(stop - start, np.float32))


def merge_chunk(task: MergeTask, inputs: MergeInputs) -> None:
    s, e = task.start, task.stop
    if task.spec is None:
        out = inputs.base.read(s, e)
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite values are carried element-wise
            out = _merged_bits(task, inputs, s, e)
    write_at(task.out_path, task.out_offset + s * out.itemsize, out, task.name)


def _sparsified(part: ModelPart, base: np.ndarray, task: MergeTask, inputs: MergeInputs) -> np.ndarray:
    s, e = task.start, task.stop
    delta = _f32(part.source, s, e)
    delta -= base
    if part.job is None:
        return delta
    ctx = part.job.context(task.index, task.seed)
    try:  # sparsifiers edit in place
        return part.job.method.edit_delta(delta, ctx)
    except NonFinite:
        raise non_finite_error(part.job.method, ctx, part.source, inputs.base, part.source.read(s, e),
                               inputs.base.read(s, e)) from None


def _merged_bits(task: MergeTask, inputs: MergeInputs, s: int, e: int) -> np.ndarray:
    """The merged output of elements [s, e) of a float tensor, as the output dtype's bits."""
    weights = [p.weight for p in inputs.parts]
    if task.linear:
        merged = linear([_f32(p.source, s, e) for p in inputs.parts], weights, task.normalize)
    else:
        spec = task.spec
        assert spec is not None  # merge_chunk copies a tensor without one
        base = _f32(inputs.base, s, e)
        deltas = [_sparsified(part, base, task, inputs) for part in inputs.parts]
        # combined a slice at a time: the temporaries stay small and in cache
        for a, b in slices(e - s):
            base[a:b] = combine(base[a:b], [d[a:b] for d in deltas], weights, spec,
                                normalize=task.normalize, lam=task.lam, official=task.official)
        merged = base
    return from_float32(np.ascontiguousarray(merged, np.float32), DTYPES[task.out_dtype],
                        out=np.empty(e - s, DTYPES[task.out_dtype].bits))
