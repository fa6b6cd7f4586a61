"""``compress``: base + fine-tune -> a delta artifact, one Dask task per chunk.

The stats passes a method needs before encoding run first (most need none). Then each write
task maps its chunk of both checkpoints, fingerprints them (CRC-32C: the base's, so apply and
verify can recognise the right base; the fine-tune's, so a lossless rebuild proves itself
bit-exact), encodes the chunk with its tensor's method, writes the result as whole zarr chunks
(a chunk that encodes to all zeros is not written), and returns the partial figures decoding
needs (e.g. BitDelta's mean magnitude: one pass suffices). The manifest is written last and the
folder renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..artifact import manifest as mf
from ..artifact.store import create_arrays, tensor_key, write_chunk, write_root_attrs, write_side_files, \
    write_state_arrays
from ..checkpoint import TensorInfo, open_checkpoint, read_bits
from ..checksum import crc32c
from ..engine import RunOptions, atomic_output, run_reduce
from ..methods import Method, StoredArray
from ..methods.base import ChunkContext, combine_partials
from ..plan import DEFAULT_CHUNK_BYTES, pair_tensors
from ..policy import Policy
from .tensors import TensorJob, batches, prepare_jobs, read_pair, run_stats_passes

__all__ = ["compress", "CompressTask", "compress_chunk", "head_crc32c"]


@dataclass(frozen=True)
class CompressTask:
    root: str
    key: str
    ft: TensorInfo
    base: TensorInfo | None
    base_numel: int
    method: Method
    ctx: ChunkContext
    arrays: tuple[StoredArray, ...]


def head_crc32c(info: TensorInfo, head_bytes: int) -> int:
    """CRC of a tensor's first head_bytes: the cheap up-front check that a base is the right one."""
    count = min(info.numel, max(1, head_bytes // info.dtype.itemsize))
    return crc32c(read_bits(info, 0, count))


def compress_chunk(task: CompressTask) -> dict:
    c = task.ctx
    base, ft = read_pair(task.ft, task.base, task.base_numel, c.start, c.stop)
    result = {"ft_crc_list": [crc32c(ft)], "base_crc_list": [crc32c(base[: max(0, task.base_numel - c.start)])]}
    if c.index == 0 and task.base is not None:
        result["head_crc_list"] = [head_crc32c(task.base, mf.HEAD_BYTES)]
    encoded, result["post"] = task.method.encode_with_stats(base, ft, c)
    del ft, base  # unmap the inputs before the (slower) compression and write
    stored = any(a.any() for a in encoded.values())
    if stored:
        for spec in task.arrays:
            write_chunk(task.root, task.key, spec, c.index, encoded[spec.role])
    result["stored_list"] = [stored]
    return result


def compress(base: str, fine_tune: str, out: str, method: Method, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
             seed: int = 0, policy: Policy = Policy(), overwrite: bool = False,
             options: RunOptions = RunOptions()) -> str:
    """Write the artifact of fine_tune's delta against base to ``out``; return its path."""
    if not method.compact:
        raise method.fail("has no compact form to store; use 'deltastream edit' to write the edited "
                          "checkpoint (compress takes: lossless, dare, bitdelta, dare_bitdelta, lowrank)")
    base_ckpt = open_checkpoint(base)
    ft_ckpt = open_checkpoint(fine_tune)
    jobs = prepare_jobs(pair_tensors(base_ckpt, ft_ckpt, chunk_bytes), method, policy, ft_ckpt)
    with atomic_output(out, overwrite=overwrite, inputs=[base_ckpt.path, ft_ckpt.path]) as root:
        write_root_attrs(root, {})
        side_keys = write_side_files(root, ft_ckpt.side_files)
        entries = []
        for batch in batches(jobs):
            entries += _compress_batch(root, batch, seed, options)
        manifest = mf.new_manifest(method=method, seed=seed, chunk_bytes=chunk_bytes, tensors=entries,
                                   side_files=side_keys, ft_metadata=ft_ckpt.metadata, policy=policy,
                                   base_path=base_ckpt.path, ft_path=ft_ckpt.path)
        write_root_attrs(root, {mf.ATTRS_KEY: manifest})
    return os.path.abspath(out)


def _compress_batch(root: str, jobs: list[TensorJob], seed: int, options: RunOptions) -> list[mf.TensorEntry]:
    """Stats passes, then the write pass, of a batch of tensors; their manifest entries."""
    run_stats_passes(jobs, seed, options, post=False)
    tasks = []
    for job in jobs:
        key = tensor_key(job.index)
        arrays = tuple(job.method.stored_arrays(job.plan.ft.dtype, job.plan.ft.shape, job.plan.chunk_elems,
                                                job.state))
        create_arrays(root, key, list(arrays))
        tasks += [CompressTask(root, key, job.plan.ft, job.plan.base, job.plan.base_numel, job.method,
                               job.context(chunk, seed), arrays) for chunk in job.plan.chunks()]
    results = run_reduce(
        compress_chunk, tasks, group_of=lambda t: t.ctx.tensor, combine=combine_partials, name="compress",
        options=options, total_bytes=sum(j.plan.ft.nbytes * 2 for j in jobs),
        bytes_of=lambda t: t.ctx.size * t.ft.dtype.itemsize * 2,
    )
    entries = []
    for job in jobs:
        r = results[job.name]
        if job.method.lossy:
            job.state = job.method.finalize_post(r.get("post"), job.state)
        stored_state = {k: v for k, v in job.state.items() if not k.startswith("_")}
        state_arrays = write_state_arrays(root, tensor_key(job.index), stored_state)
        entries.append(_entry(job, r, stored_state, state_arrays))
        job.state = {}  # written: let the batch's memory go
    return entries


def _entry(job: TensorJob, r: dict, state: dict, state_arrays: list[str]) -> mf.TensorEntry:
    plan = job.plan
    base = None
    if plan.base is not None:
        base = {"dtype": plan.base.dtype.name, "shape": list(plan.base.shape),
                "head_crc32c": r["head_crc_list"][0], "chunk_crc32c": r["base_crc_list"]}
    json_state = {k: v for k, v in state.items() if k not in state_arrays}
    return mf.TensorEntry(
        name=plan.name, key=tensor_key(job.index), dtype=plan.ft.dtype, shape=plan.ft.shape,
        policy=job.policy, chunk_elems=plan.chunk_elems, base=base, ft_chunk_crc32c=r["ft_crc_list"],
        stored_chunks=r["stored_list"], rng_name=job.rng_name, state=json_state, state_arrays=state_arrays,
    )
