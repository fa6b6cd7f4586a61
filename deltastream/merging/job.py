"""``merge``: a mergekit config -> one merged checkpoint, every input streamed chunk by chunk.

The plan (``merging.plan``) is built first, from headers and manifests alone: every problem is
reported before any output exists. Models given as deltastream artifacts are read through chunk
sources (decoded chunk by chunk over the base: nothing temporary is written).

Then the executor runs, through the engine as the other jobs do: the per-(model, tensor)
sparsifiers' stats passes (exact thresholds for trims, L1 factors for DARE/DELLA rescale), and
one write pass in which each task merges one chunk of one tensor in place in the output shards.
Outputs: shards + index, the base's config (torch_dtype set) and tokenizer files, a README.md
model card, the config used (mergekit_config.yml).

Memory: a task holds ``merge_footprint(models)`` bytes per byte of its input chunk; the chunk
size shrinks so that workers x footprint x chunk fits ``memory`` (``api.effective_chunk_bytes``,
the model the other jobs use).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from .._version import __version__
from ..checkpoint import CheckpointWriter, OutputTensor
from ..engine import RunOptions, job_output, run_tasks
from ..jobs.tensors import run_stats_passes
from ..methods.base import NonFiniteDelta
from ..plan import DEFAULT_CHUNK_BYTES
from .chunk import MergeTask, merge_chunk
from .outputs import finish_outputs, model_card, write_config_and_card
from .plan import MergePlan, build_plan
from .streamed import StreamedPlan, execute_streamed

__all__ = ["merge", "execute", "MergeTask", "merge_chunk", "model_card"]


def merge(config: str, out: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, memory: int = 1 << 30, seed: int = 0,
          strict: bool = False, max_shard_size: int = 5 * 10**9, overwrite: bool = False, resume: bool = False,
          options: RunOptions = RunOptions()) -> str:
    """Merge the config's models into the checkpoint folder ``out``; return its path. ``chunk_bytes``
    is the largest input chunk, shrunk to fit ``memory`` (bytes for the chunks in flight)."""
    plan = build_plan(config, chunk_bytes=chunk_bytes, memory=memory, seed=seed, strict=strict, options=options)
    # an artifact model's chunk reads are not journaled as a checkpoint's are: its manifest
    # digest (which covers every stored chunk's CRC) stands for them, so a replaced one is noticed
    fingerprint = {"merge": plan.cfg.text, "seed": seed, "chunk": plan.chunk_bytes, "strict": strict,
                   "shard": max_shard_size, "artifacts": plan.artifacts}
    with job_output(out, overwrite=overwrite, inputs=plan.inputs, resume=resume, plan=fingerprint,
                    options=options) as (folder, options):
        if isinstance(plan, StreamedPlan):
            execute_streamed(plan, folder, max_shard_size, resume, options)
        else:
            execute(plan, folder, max_shard_size, resume, options)
        write_config_and_card(folder, plan.cfg, os.path.basename(os.path.abspath(out)), seed)
    return os.path.abspath(out)


def execute(plan: MergePlan, folder: str, max_shard_size: int, resume: bool, options: RunOptions) -> None:
    """The stats passes, then the write pass, into the partial output ``folder``."""
    with _non_finite_remedy(plan.cfg.method):
        run_stats_passes(list(plan.jobs.values()), plan.seed, options, post=True)
    outputs = [OutputTensor(t.name, t.out_dtype, t.base.shape) for t in plan.tensors]
    metadata = {"deltastream_merge": plan.cfg.method, "deltastream_seed": str(plan.seed),
                "deltastream_version": __version__}
    writer = CheckpointWriter(folder, outputs, max_shard_size, metadata)
    writer.create(keep_existing=resume, journal=options.journal)
    tasks, inputs = plan.tasks(writer.location)
    with _non_finite_remedy(plan.cfg.method):
        run_tasks(merge_chunk, tasks, name="merge", options=options, total_bytes=sum(t.nbytes for t in tasks),
                  bytes_of=lambda t: t.nbytes, shared=inputs, uses=lambda t: (t.inputs,))
    finish_outputs(folder, plan.reference.side_files, plan.cfg, plan.config_updates, plan.vocab)


@contextmanager
def _non_finite_remedy(method: str):
    """A sparsifier's non-finite error, with the merge's own reason (a merge has no --exclude)."""
    try:
        yield
    except NonFiniteDelta as exc:
        raise NonFiniteDelta(exc.args[0], f"merge_method '{method}' sparsifies by figures over the whole tensor or "
                             "row and refuses a non-finite delta (linear, task_arithmetic and a plain DARE carry "
                             "it element-wise)") from None
