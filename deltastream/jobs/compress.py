"""``compress``: base + fine-tune -> a delta artifact, one Dask task per chunk.

Each task maps its chunk of both checkpoints, fingerprints them (CRC-32C: the base's, so apply
and verify can recognise the right base; the fine-tune's, so a rebuild can prove itself
bit-exact), encodes the chunk with the method and writes the result as whole zarr chunks. A chunk
that encodes to all zeros (an unchanged stretch of a tensor) is not written at all. The
manifest is written last, from the tasks' results, and the folder renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..artifact import manifest as mf
from ..artifact.store import create_arrays, tensor_key, write_chunk, write_root_attrs, write_side_files
from ..checkpoint import TensorInfo, open_checkpoint, read_bits
from ..checksum import crc32c
from ..engine import RunOptions, atomic_output, run_tasks
from ..methods import Method, StoredArray
from ..plan import DEFAULT_CHUNK_BYTES, Chunk, pair_tensors

__all__ = ["compress", "CompressTask", "compress_chunk"]


@dataclass(frozen=True)
class CompressTask:
    root: str
    key: str
    chunk: Chunk
    ft: TensorInfo
    base: TensorInfo | None
    method: Method
    arrays: tuple[StoredArray, ...]


def head_crc32c(info: TensorInfo, head_bytes: int) -> int:
    """CRC of a tensor's first head_bytes: the cheap up-front check that a base is the right one."""
    count = min(info.numel, max(1, head_bytes // info.dtype.itemsize))
    return crc32c(read_bits(info, 0, count))


def compress_chunk(task: CompressTask) -> dict:
    c = task.chunk
    ft = read_bits(task.ft, c.start, c.stop)
    result = {"ft_crc": crc32c(ft)}
    if task.base is not None:
        base = read_bits(task.base, c.start, c.stop)
        result["base_crc"] = crc32c(base)
        if c.index == 0:
            result["head_crc"] = head_crc32c(task.base, mf.HEAD_BYTES)
    else:
        base = np.zeros_like(ft)
    encoded = task.method.encode(base, ft, task.ft.dtype)
    del ft, base  # unmap the inputs before the (slower) compression and write
    stored = any(a.any() for a in encoded.values())
    if stored:
        for spec in task.arrays:
            write_chunk(task.root, task.key, spec, c.index, encoded[spec.role])
    result["stored"] = stored
    return result


def compress(base: str, fine_tune: str, out: str, method: Method, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
             seed: int | None = None, overwrite: bool = False, options: RunOptions = RunOptions()) -> str:
    """Write the artifact of fine_tune's delta against base to ``out``; return its path."""
    base_ckpt = open_checkpoint(base)
    ft_ckpt = open_checkpoint(fine_tune)
    plans = pair_tensors(base_ckpt, ft_ckpt, chunk_bytes)
    with atomic_output(out, overwrite=overwrite, inputs=[base_ckpt.path, ft_ckpt.path]) as root:
        write_root_attrs(root, {})
        tasks = []
        for i, plan in enumerate(plans):
            key = tensor_key(i)
            arrays = tuple(method.stored_arrays(plan.ft.dtype, plan.numel, plan.chunk_elems))
            create_arrays(root, key, list(arrays))
            tasks += [CompressTask(root, key, chunk, plan.ft, plan.base, method, arrays)
                      for chunk in plan.chunks()]
        side_keys = write_side_files(root, ft_ckpt.side_files)
        results = run_tasks(
            compress_chunk, tasks, name="compress", options=options,
            total_bytes=sum(p.ft.nbytes * (2 if p.base else 1) for p in plans),
            bytes_of=lambda t: (t.chunk.stop - t.chunk.start) * t.ft.dtype.itemsize * (2 if t.base else 1),
        )
        entries = _entries(plans, tasks, results)
        manifest = mf.new_manifest(method=method, seed=seed, chunk_bytes=chunk_bytes, tensors=entries,
                                   side_files=side_keys, ft_metadata=ft_ckpt.metadata,
                                   base_path=base_ckpt.path, ft_path=ft_ckpt.path)
        write_root_attrs(root, {mf.ATTRS_KEY: manifest})
    return os.path.abspath(out)


def _entries(plans, tasks: list[CompressTask], results: list[dict]) -> list[mf.TensorEntry]:
    by_tensor: dict[str, list[dict]] = {}
    for task, result in zip(tasks, results):
        by_tensor.setdefault(task.chunk.tensor, []).append(result)
    entries = []
    for i, plan in enumerate(plans):
        rs = by_tensor[plan.name]
        base = None
        if plan.base is not None:
            base = {"dtype": plan.base.dtype.name, "shape": list(plan.base.shape),
                    "head_crc32c": rs[0]["head_crc"], "chunk_crc32c": [r["base_crc"] for r in rs]}
        entries.append(mf.TensorEntry(
            name=plan.name, key=tensor_key(i), dtype=plan.ft.dtype, shape=plan.ft.shape,
            policy=plan.policy if plan.base is not None else "new", chunk_elems=plan.chunk_elems,
            base=base, ft_chunk_crc32c=[r["ft_crc"] for r in rs], stored_chunks=[r["stored"] for r in rs],
        ))
    return entries
