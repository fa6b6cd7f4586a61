"""The sparsifiers of a merge as jobs of the shared stats passes (``jobs.tensors``).

A :class:`SparsifierJob` is one (model, tensor) that a sparsifier edits: its key ``model NUL
tensor`` names its random stream and its stats group, so that a mask depends only on (seed,
model, tensor, element). Its passes are the methods' own, run by
:func:`deltastream.jobs.tensors.run_stats_passes` as compress's and edit's are; a model may be an
artifact, so both inputs are :mod:`deltastream.sources` sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..methods.base import ChunkContext, LossyMethod
from ..plan import chunk_ranges
from ..sources import Source

__all__ = ["SparsifierJob"]


@dataclass
class SparsifierJob:
    key: str  # model NUL tensor
    part: Source  # the model's tensor, cropped to the base's rows
    base: Source
    method: LossyMethod
    chunk_elems: int  # whole rows (DELLA ranks within rows); the write pass follows this chunking
    state: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key

    @property
    def shape(self) -> tuple[int, ...]:
        return self.part.shape

    def sources(self) -> tuple[Source, Source]:
        return self.part, self.base

    def chunks(self) -> list[tuple[int, int]]:
        return chunk_ranges(math.prod(self.part.shape), self.chunk_elems)

    def context(self, index: int, seed: int, *, state: bool = True) -> ChunkContext:
        start, stop = self.chunks()[index]
        return ChunkContext(tensor=self.key, dtype=self.part.dtype, shape=self.part.shape, start=start, stop=stop,
                            index=index, seed=seed, rng_name=self.key, state=self.state if state else {})

    def contexts(self, seed: int) -> list[ChunkContext]:
        return [self.context(k, seed, state=False) for k in range(len(self.chunks()))]
