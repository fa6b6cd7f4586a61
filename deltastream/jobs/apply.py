"""``apply`` and ``verify``: rebuild a fine-tune from base + artifact, chunk by chunk.

Before any output exists, the base is checked against the artifact's fingerprint: every tensor
present with the recorded dtype and shape, and the CRC of each tensor's first 64 KiB. During the
run every base chunk's CRC is checked too (a base that differs deeper inside is still refused,
and the partial output removed), every stored chunk's data must have the CRC the manifest
records (format 1.1: lossy tensors included), and every rebuilt chunk's CRC must equal the
fine-tune's, which proves a lossless rebuild bit-exact. The manifest and every state array are
checked before any output exists. ``verify`` runs the same tasks without writing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..artifact.manifest import Manifest, TensorEntry, load_manifest
from ..artifact.store import chunk_file, read_chunk, valid_len
from ..checkpoint import Checkpoint, CheckpointWriter, OutputTensor, TensorInfo, open_checkpoint
from ..checkpoint.writer import write_at
from ..checksum import crc32c
from ..engine import RunOptions, job_output, run_tasks
from ..errors import CorruptChunkError, WrongBaseError, escape, tensor_context
from ..methods import Method, StoredArray
from ..methods.base import ChunkContext
from ..plan import chunk_ranges
from .compress import head_crc32c
from .tensors import read_pair_base

__all__ = ["apply", "verify", "RebuildTask", "rebuild_chunk", "check_chunk", "check_base", "DEFAULT_MAX_SHARD"]

DEFAULT_MAX_SHARD = 5 * 10**9  # Hugging Face's default


@dataclass(frozen=True)
class RebuildTask:
    root: str
    entry_key: str
    ctx: ChunkContext
    base: TensorInfo | None
    base_numel: int
    base_crc: int | None
    ft_crc: int | None  # None: a lossy tensor, whose output is not the fine-tune's
    stored: bool
    method: Method
    arrays: tuple[StoredArray, ...]
    stored_crc: tuple[int | None, ...]  # per array, the CRC of this chunk's data (None: format 1.0)
    out_path: str | None  # None: verify only
    out_offset: int


def rebuild_chunk(task: RebuildTask) -> dict:
    c = task.ctx
    if task.base is not None:
        base = read_pair_base(task.base, task.base_numel, c.start, c.stop, c.dtype)
        if crc32c(base[: max(0, task.base_numel - c.start)]) != task.base_crc:
            raise WrongBaseError(f"{tensor_context(task.base.path, c.tensor)}: the base differs from the "
                                 f"one the artifact was made from (chunk {c.index}, elements {c.start}..{c.stop})")
    else:  # a tensor new in the fine-tune is stored against zeros
        base = np.zeros(c.size, c.dtype.bits)
    out = task.method.decode(base, _stored_chunk(task), c)
    if task.ft_crc is not None and crc32c(out) != task.ft_crc:
        where = chunk_file(task.root, task.entry_key, task.arrays[0].role, c.index) if task.arrays else task.root
        raise CorruptChunkError(f"{tensor_context(where, c.tensor)}: rebuilt chunk {c.index} does not "
                                "match the fine-tune's checksum (corrupt or missing artifact chunk)")
    if task.out_path is not None:
        write_at(task.out_path, task.out_offset + c.start * out.itemsize, out, c.tensor)
    return {}


def _stored_chunk(task: RebuildTask) -> dict[str, np.ndarray]:
    """The chunk's stored arrays; one that was never written (all zeros) is the fill value."""
    i = task.ctx.index
    if task.stored:
        return {s.role: read_chunk(task.root, task.entry_key, s, i, task.ctx.tensor, crc)
                for s, crc in zip(task.arrays, task.stored_crc)}
    return {s.role: np.zeros(valid_len(s, i), s.dtype) for s in task.arrays}


def check_chunk(task: RebuildTask) -> dict:
    """verify without a base: a stored chunk must exist, decode and match its checksums (read_chunk
    reports a missing one)."""
    if task.stored:
        _stored_chunk(task)
    return {}


def check_base(manifest: Manifest, base: Checkpoint) -> None:
    """Refuse a base that is not the artifact's, reading only 64 KiB per tensor."""
    expected = {t.name: t for t in manifest.tensors if t.base is not None}
    for name, info in base.tensors.items():
        if name not in expected:
            raise WrongBaseError(f"{tensor_context(info.path, name)}: not in the artifact's base: "
                                 f"wrong base for '{escape(manifest.path)}'")
    for name, entry in expected.items():
        info = base.tensors.get(name)
        if info is None:
            raise WrongBaseError(f"{tensor_context(base.path, name)}: missing from the base: "
                                 f"wrong base for '{escape(manifest.path)}'")
        fp = entry.base
        if info.dtype.name != fp["dtype"] or list(info.shape) != fp["shape"]:
            raise WrongBaseError(f"{tensor_context(info.path, name)}: {info.dtype.name} {info.shape}, but the "
                                 f"artifact's base has {fp['dtype']} {tuple(fp['shape'])}: wrong base")
        if head_crc32c(info, manifest.doc["head_bytes"]) != fp["head_crc32c"]:
            raise WrongBaseError(f"{tensor_context(info.path, name)}: contents differ from the artifact's "
                                 f"base: wrong base for '{escape(manifest.path)}'")


@dataclass(frozen=True)
class _Decoding:
    """What decoding one tensor needs besides its chunks: read (and checked) before any output."""

    entry: TensorEntry
    state: dict
    arrays: tuple[StoredArray, ...]
    method: Method


def _decodings(manifest: Manifest) -> list[_Decoding]:
    out = []
    for entry in manifest.tensors:
        state = manifest.state(entry)
        out.append(_Decoding(entry, state, tuple(manifest.arrays(entry, state)), manifest.method_for(entry)))
    return out


def _tasks(manifest: Manifest, decodings: list[_Decoding], base: Checkpoint | None, where=None,
           device: str = "cpu") -> list[RebuildTask]:
    tasks = []
    seed = manifest.doc.get("seed") or 0
    for d in decodings:
        entry, state, arrays, method = d.entry, d.state, d.arrays, d.method
        crcs = entry.stored_crc32c
        out_path, out_offset = where(entry.name) if where else (None, 0)
        binfo = base.tensors[entry.name] if base is not None and entry.base is not None else None
        for i, (start, stop) in enumerate(chunk_ranges(entry.numel, entry.chunk_elems)):
            ctx = ChunkContext(tensor=entry.name, dtype=entry.dtype, shape=entry.shape, start=start, stop=stop,
                               index=i, seed=seed, rng_name=entry.rng_name, state=state, device=device)
            tasks.append(RebuildTask(
                root=manifest.path, entry_key=entry.key, ctx=ctx, base=binfo, base_numel=entry.base_numel,
                base_crc=entry.base["chunk_crc32c"][i] if binfo is not None else None,
                ft_crc=None if method.lossy else entry.ft_chunk_crc32c[i], stored=entry.stored_chunks[i],
                method=method, arrays=arrays,
                stored_crc=tuple(crcs[s.role][i] if crcs is not None else None for s in arrays),
                out_path=out_path, out_offset=out_offset))
    return tasks


def _run(fn, tasks: list[RebuildTask], name: str, options: RunOptions, entries: list[TensorEntry]) -> None:
    run_tasks(fn, tasks, name=name, options=options, total_bytes=sum(e.nbytes for e in entries),
              bytes_of=lambda t: t.ctx.size * t.ctx.dtype.itemsize)


def apply(base: str, artifact: str, out: str, *, max_shard_size: int = DEFAULT_MAX_SHARD,
          overwrite: bool = False, resume: bool = False, options: RunOptions = RunOptions(),
          device: str = "cpu") -> str:
    """Rebuild the fine-tune into the checkpoint folder ``out``; return its path. ``device`` "cuda"
    decodes the chunks of dare and 1-bit bitdelta tensors on the GPU (the same bits)."""
    manifest = load_manifest(os.path.abspath(artifact))
    base_ckpt = open_checkpoint(base)
    check_base(manifest, base_ckpt)
    decodings = _decodings(manifest)
    outputs = [OutputTensor(e.name, e.dtype.name, e.shape) for e in manifest.tensors]
    plan = {"apply": manifest.digest, "shard": max_shard_size}
    with job_output(out, overwrite=overwrite, inputs=[*base_ckpt.files, manifest.path], resume=resume, plan=plan,
                    options=options, needed=sum(o.nbytes for o in outputs)) as (folder, options):
        writer = CheckpointWriter(folder, outputs, max_shard_size, manifest.doc.get("fine_tune_metadata"))
        writer.create(keep_existing=resume, journal=options.journal)
        for name in manifest.side_files:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(manifest.read_side_file(name))  # names checked on load
        _run(rebuild_chunk, _tasks(manifest, decodings, base_ckpt, writer.location, device), "apply", options,
             manifest.tensors)
    return os.path.abspath(out)


def verify(artifact: str, base: str | None = None, *, options: RunOptions = RunOptions()) -> Manifest:
    """Check an artifact's integrity; with a base, also that it is the right base and that the
    rebuild reproduces the fine-tune's checksums. Raises on the first problem."""
    manifest = load_manifest(os.path.abspath(artifact))
    for name in manifest.side_files:
        manifest.read_side_file(name)
    decodings = _decodings(manifest)
    if base is not None:
        base_ckpt = open_checkpoint(base)
        check_base(manifest, base_ckpt)
        _run(rebuild_chunk, _tasks(manifest, decodings, base_ckpt), "verify", options, manifest.tensors)
    else:
        _run(check_chunk, _tasks(manifest, decodings, None), "verify", options, manifest.tensors)
    return manifest
