"""What compress and edit share: each tensor's policy and method, reading chunk pairs, and the
statistics passes that run before (and, for edit, after) a method's encoding is known.

A :class:`TensorJob` is the driver's view of one tensor: its plan, its policy (the run's method,
or exact storage), the method that encodes it, the name of its random stream, and its state
(figures the stats passes found: scales, thresholds, factors). Tasks are frozen dataclasses of
plain data, so the same passes run on threads or a dask.distributed cluster. A task's context
leaves the state out: the graph holds each tensor's state once and hands it to the task function
by reference (``run_tasks``' ``shared``), which puts it back with :func:`with_state`; a task
weighs a few hundred bytes even when the state is low rank's factor matrices.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from ..checkpoint import Checkpoint, TensorInfo, load_side_file
from ..engine import RunOptions, run_reduce
from ..exact import NonFinite
from ..methods import Method
from ..methods.base import ChunkContext, combine_partials, float_delta, non_finite_error
from ..methods.lossless import Lossless
from ..plan import Chunk, TensorPlan
from ..policy import Policy
from ..sources import CheckpointSource, PaddedBase, Readable, read_pair_base, read_tensor

__all__ = ["StatsJob", "StatsTask", "TensorJob", "batches", "prepare_jobs", "read_pair", "read_pair_base",
           "run_stats_passes", "stats_chunk", "tied_aliases", "with_state"]

_EXACT = Lossless()


@dataclass
class TensorJob:
    index: int
    plan: TensorPlan
    policy: str
    method: Method
    rng_name: str
    state: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.plan.ft.shape

    def sources(self) -> tuple[CheckpointSource, PaddedBase]:
        """(fine-tune, base) as the stats passes read them."""
        return CheckpointSource(self.plan.ft), PaddedBase(self.plan.base, self.plan.base_numel, self.plan.ft.dtype)

    def contexts(self, seed: int) -> list[ChunkContext]:
        return [self.context(c, seed, state=False) for c in self.plan.chunks()]

    def context(self, chunk: Chunk, seed: int, chunk_state: dict | None = None, device: str = "cpu", *,
                state: bool = True) -> ChunkContext:
        """The chunk's context; with ``state=False`` without the tensor's state, for a task that
        receives the state by reference (see :func:`with_state`)."""
        return ChunkContext(tensor=self.name, dtype=self.plan.ft.dtype, shape=self.plan.ft.shape,
                            start=chunk.start, stop=chunk.stop, index=chunk.index, seed=seed,
                            rng_name=self.rng_name, state=self.state if state else {},
                            chunk_state=chunk_state or {}, device=device)


def with_state(ctx: ChunkContext, state: dict) -> ChunkContext:
    """A task's context with its tensor's state, which reached the task as a graph argument."""
    return replace(ctx, state=state)


def tied_aliases(ft: Checkpoint) -> dict[str, str]:
    """Tensors that share their twin's random stream: lm_head of a model with tied embeddings."""
    config_path = ft.side_files.get("config.json")
    if not config_path:
        return {}
    text = load_side_file(config_path)  # a file that is no longer regular is refused, not skipped
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):  # unreadable JSON: no ties (the file is carried as it is)
        return {}
    if not isinstance(config, dict) or not config.get("tie_word_embeddings", False):
        return {}
    embed = next((n for n in ft.tensors if n.endswith("embed_tokens.weight")), None)
    head = next((n for n in ft.tensors if n.endswith("lm_head.weight")), None)
    return {head: embed} if embed and head else {}


def prepare_jobs(plans: list[TensorPlan], method: Method, policy: Policy, ft: Checkpoint) -> list[TensorJob]:
    aliases = tied_aliases(ft)
    jobs = []
    for i, plan in enumerate(plans):
        base_shape = plan.base.shape if plan.base is not None else None
        chosen = policy.assign(plan.ft, method, base_shape)
        tensor_method = method if chosen == method.method_id else _EXACT
        jobs.append(TensorJob(index=i, plan=plan, policy=chosen, method=tensor_method,
                              rng_name=aliases.get(plan.name, plan.name),
                              state=tensor_method.initial_state(plan.ft.shape)))
    return jobs


def read_pair(ft: TensorInfo, base: TensorInfo | None, base_numel: int, start: int,
              stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(base bits, fine-tune bits) of elements [start, stop); base elements it lacks read as 0."""
    return read_pair_base(base, base_numel, start, stop, ft.dtype), read_tensor(ft, start, stop)


class StatsJob(Protocol):
    """What the stats passes need of a tensor to edit: compress's and edit's TensorJob, merge's
    SparsifierJob (one model's tensor, perhaps decoded from an artifact)."""

    state: dict

    @property
    def method(self) -> Method: ...

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def sources(self) -> tuple[Readable, Readable]: ...

    def contexts(self, seed: int) -> list[ChunkContext]: ...


@dataclass(frozen=True)
class StatsTask:
    ft: Readable
    base: Readable
    method: Method
    ctx: ChunkContext  # without the state, which the task receives by reference
    pass_index: int  # -1: the post pass
    group: str
    state: int  # which of the graph's shared states is its tensor's


def stats_chunk(task: StatsTask, state: dict):
    ctx = with_state(task.ctx, state)
    base, ft = task.base.read(ctx.start, ctx.stop), task.ft.read(ctx.start, ctx.stop)
    delta = float_delta(base, ft, ctx)
    try:
        if task.pass_index < 0:
            return task.method.post_stats(delta, ctx)
        return task.method.pre_stats(task.pass_index, delta, ctx)
    except NonFinite:
        raise non_finite_error(task.method, ctx, task.ft, task.base, ft, base) from None


#: the driver memory the tensors of one batch may hold in state and pass partials
STATE_BUDGET = 256 << 20


def batches(jobs: list[TensorJob], budget: int = STATE_BUDGET) -> list[list[TensorJob]]:
    """Consecutive runs of tensors whose state fits the budget together (one run if none has
    state): each batch runs its passes and its write, then lets its state go."""
    out: list[list[TensorJob]] = [[]]
    used = 0
    for job in jobs:
        size = job.method.state_bytes(job.plan.ft.shape) if job.method.lossy else 0
        if out[-1] and size and used + size > budget:
            out.append([])
            used = 0
        out[-1].append(job)
        used += size
    return out


def run_stats_passes(jobs: Sequence[StatsJob], seed: int, options: RunOptions, *, post: bool) -> None:
    """Run every pre pass (and the post pass if ``post``) of the lossy tensors, updating states."""
    lossy = [j for j in jobs if j.method.lossy]
    passes = max((j.method.pre_passes(j.shape) for j in lossy), default=0)
    for i in list(range(passes)) + ([-1] if post else []):
        todo = [j for j in lossy if (j.method.has_post_stats if i < 0 else i < j.method.pre_passes(j.shape))]
        tasks = [StatsTask(*j.sources(), j.method, ctx, i, j.name if i < 0 else j.method.stats_group(i, j.name), k)
                 for k, j in enumerate(todo) for ctx in j.contexts(seed)]
        if not tasks:
            continue
        label = "stats" if i >= 0 else "scales"
        bytes_of = lambda t: t.ctx.size * t.ft.dtype.itemsize * 2  # noqa: E731
        combined = run_reduce(stats_chunk, tasks, group_of=lambda t: t.group, combine=combine_partials,
                              name=f"{label}-{i}" if i >= 0 else label, options=options,
                              total_bytes=sum(bytes_of(t) for t in tasks), bytes_of=bytes_of,
                              shared=[j.state for j in todo], uses=lambda t: (t.state,))
        for j in todo:
            if i < 0:
                j.state = j.method.finalize_post(combined.get(j.name), j.state)
            else:
                j.state = j.method.finalize_pre(i, combined[j.method.stats_group(i, j.name)], j.state)

