"""``edit``: base + fine-tune -> base + edited delta, written as a checkpoint (the paper's runs).

It runs the method's stats passes (those before encoding, then those decoding needs: an edited
output needs every figure up front), then one write pass in which each task computes its chunk's
output bits with ``Method.edit_bits`` and writes them in place in the output shards. For methods
with a compact form, ``edit_bits`` is ``decode(encode(chunk))``, so an ``edit`` and the ``apply``
of the artifact ``compress`` writes give the same bits. Tensors the policy keeps exact are copied
bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..checkpoint import CheckpointWriter, OutputTensor, TensorInfo, copy_side_file, open_checkpoint
from ..checkpoint.writer import write_at
from ..engine import RunOptions, job_output, run_tasks
from ..methods import Method
from ..methods.base import ChunkContext
from ..plan import DEFAULT_CHUNK_BYTES, pair_tensors
from ..policy import Policy
from ..sources import open_fine_tune
from .tensors import batches, prepare_jobs, read_pair, run_stats_passes, with_state

__all__ = ["edit", "EditTask", "edit_chunk"]


@dataclass(frozen=True)
class EditTask:
    ft: TensorInfo
    base: TensorInfo | None
    base_numel: int
    method: Method
    ctx: ChunkContext
    out_path: str
    out_offset: int
    state: int  # which of the graph's shared states is its tensor's


def edit_chunk(task: EditTask, state: dict) -> None:
    c = with_state(task.ctx, state)
    base, ft = read_pair(task.ft, task.base, task.base_numel, c.start, c.stop)
    out = task.method.edit_bits(base, ft, c) if task.method.lossy else ft
    write_at(task.out_path, task.out_offset + c.start * c.dtype.itemsize, out, c.tensor)


def edit(base: str, fine_tune: str, out: str, method: Method, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
         seed: int = 0, policy: Policy = Policy(), max_shard_size: int = 5 * 10**9, overwrite: bool = False,
         options: RunOptions = RunOptions(), keep_state: bool = False, resume: bool = False,
         device: str = "cpu") -> tuple[str, list]:
    """Write base + method(delta) as a checkpoint folder ``out``; return its path and the jobs
    (their policies and states, for reporting; array states are dropped after each batch unless
    ``keep_state``). ``device`` "cuda" computes each chunk's edit on the GPU (deltastream.device)."""
    base_ckpt = open_checkpoint(base)
    ft_ckpt = open_fine_tune(fine_tune, base_ckpt)
    jobs = prepare_jobs(pair_tensors(base_ckpt, ft_ckpt, chunk_bytes), method, policy, ft_ckpt)
    outputs = [OutputTensor(j.name, j.plan.ft.dtype.name, j.plan.ft.shape) for j in jobs]
    metadata = {**ft_ckpt.metadata, "deltastream_method": method.method_id,
                "deltastream_params": json.dumps(method.get_config(), sort_keys=True), "deltastream_seed": str(seed)}
    plan = {"edit": method.get_config(), "seed": seed, "chunk": chunk_bytes, "policy": repr(policy),
            "shard": max_shard_size}
    with job_output(out, overwrite=overwrite, inputs=[*base_ckpt.files, *ft_ckpt.files], resume=resume, plan=plan,
                    options=options, needed=sum(o.nbytes for o in outputs)) as (folder, options):
        writer = CheckpointWriter(folder, outputs, max_shard_size, metadata)
        writer.create(keep_existing=resume, journal=options.journal)
        for name, path in ft_ckpt.side_files.items():
            copy_side_file(path, os.path.join(folder, name))
        for batch in batches(jobs):  # passes then writes, a batch of tensors' state at a time
            run_stats_passes(batch, seed, options, post=True)
            tasks = [EditTask(j.plan.ft, j.plan.base, j.plan.base_numel, j.method,
                              j.context(chunk, seed, device=device, state=False), *writer.location(j.name), k)
                     for k, j in enumerate(batch) for chunk in j.plan.chunks()]
            run_tasks(edit_chunk, tasks, name="edit", options=options,
                      total_bytes=sum(j.plan.ft.nbytes * 2 for j in batch),
                      bytes_of=lambda t: t.ctx.size * t.ctx.dtype.itemsize * 2,
                      shared=[j.state for j in batch], uses=lambda t: (t.state,))
            for job in batch if not keep_state else ():
                job.state = {k: v for k, v in job.state.items() if not isinstance(v, np.ndarray)}
    return os.path.abspath(out), jobs
