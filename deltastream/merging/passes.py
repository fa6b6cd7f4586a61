"""The sparsifiers' statistics passes of a merge, read through chunk sources.

A :class:`SparsifierJob` is one (model, tensor) that a sparsifier edits: its key ``model NUL
tensor`` names its random stream and its stats group, so that a mask depends only on (seed,
model, tensor, element). The passes are the methods' own (``pre_stats``/``finalize_pre``, then
``post_stats``/``finalize_post``), run through ``engine.run_reduce`` as ``jobs.tensors`` runs
compress's and edit's; the difference is that a model may be an artifact, so both inputs are
:mod:`deltastream.sources` sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..engine import RunOptions, run_reduce
from ..exact import NonFinite
from ..methods.base import ChunkContext, LossyMethod, combine_partials, non_finite_error
from ..plan import chunk_ranges
from ..sources import Source

__all__ = ["SparsifierJob", "StatsTask", "stats_chunk", "run_passes"]


@dataclass
class SparsifierJob:
    key: str  # model NUL tensor
    part: Source  # the model's tensor, cropped to the base's rows
    base: Source
    method: LossyMethod
    chunk_elems: int  # whole rows (DELLA ranks within rows); the write pass follows this chunking
    state: dict = field(default_factory=dict)

    def chunks(self) -> list[tuple[int, int]]:
        return chunk_ranges(math.prod(self.part.shape), self.chunk_elems)

    def context(self, index: int, seed: int) -> ChunkContext:
        start, stop = self.chunks()[index]
        return ChunkContext(tensor=self.key, dtype=self.part.dtype, shape=self.part.shape, start=start, stop=stop,
                            index=index, seed=seed, rng_name=self.key, state=self.state)


@dataclass(frozen=True)
class StatsTask:
    part: Source
    base: Source
    method: LossyMethod
    ctx: ChunkContext
    pass_index: int  # -1: the post pass
    group: str


def stats_chunk(task: StatsTask):
    c = task.ctx
    base, ft = task.base.read(c.start, c.stop), task.part.read(c.start, c.stop)
    delta = task.method.delta(base, ft, c)
    try:
        if task.pass_index < 0:
            return task.method.post_stats(delta, c)
        return task.method.pre_stats(task.pass_index, delta, c)
    except NonFinite:
        raise non_finite_error(task.method, c, task.part, task.base, ft, base) from None


def _wants(job: SparsifierJob, i: int) -> bool:
    return job.method.has_post_stats if i < 0 else i < job.method.pre_passes(job.part.shape)


def run_passes(jobs: list[SparsifierJob], seed: int, options: RunOptions) -> None:
    """Every pre pass, then the post pass, of every job, updating the jobs' states."""
    passes = max((j.method.pre_passes(j.part.shape) for j in jobs), default=0)
    for i in [*range(passes), -1]:
        todo = [j for j in jobs if _wants(j, i)]
        tasks = [StatsTask(j.part, j.base, j.method, j.context(k, seed), i,
                           j.key if i < 0 else j.method.stats_group(i, j.key))
                 for j in todo for k in range(len(j.chunks()))]
        if not tasks:
            continue
        label = f"stats-{i}" if i >= 0 else "scales"
        combined = run_reduce(stats_chunk, tasks, group_of=lambda t: t.group, combine=combine_partials, name=label,
                              options=options, total_bytes=sum(t.ctx.size * t.part.dtype.itemsize * 2 for t in tasks),
                              bytes_of=lambda t: t.ctx.size * t.part.dtype.itemsize * 2)
        for j in todo:
            if i < 0:
                j.state = j.method.finalize_post(combined.get(j.key), j.state)
            else:
                j.state = j.method.finalize_pre(i, combined[j.method.stats_group(i, j.key)], j.state)
