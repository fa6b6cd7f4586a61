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
from ..artifact.store import (
    create_arrays,
    tensor_key,
    write_chunk,
    write_root_attrs,
    write_side_files,
    write_state_arrays,
)
from ..checkpoint import TensorInfo, head_crc32c, open_checkpoint
from ..checksum import crc32c
from ..engine import RunOptions, job_output, run_reduce
from ..errors import ParameterError
from ..exact import NonFinite
from ..methods import METHODS, Method, StoredArray
from ..methods.base import ChunkContext, combine_partials, non_finite_error
from ..plan import DEFAULT_CHUNK_BYTES, pair_tensors
from ..policy import Policy
from ..sources import open_fine_tune, read_tensor
from .tensors import TensorJob, batches, prepare_jobs, read_pair_base, run_stats_passes, with_state

__all__ = ["compress", "compress_many", "CompressTask", "compress_chunk"]


@dataclass(frozen=True)
class Target:
    """One fine-tune's chunk to encode into its artifact."""

    root: str
    key: str
    ft: TensorInfo
    method: Method
    ctx: ChunkContext  # without the tensor's state: that reaches compress_chunk by reference
    arrays: tuple[StoredArray, ...]
    state: int  # which of the graph's shared states is its tensor's


@dataclass(frozen=True)
class CompressTask:
    """One chunk of one tensor: the base's range, read once, and every fine-tune encoded from it."""

    tensor: str
    base: TensorInfo | None
    base_numel: int
    targets: tuple[Target, ...]

    @property
    def nbytes(self) -> int:
        c = self.targets[0].ctx
        return c.size * c.dtype.itemsize * (1 + len(self.targets))


def compress_chunk(task: CompressTask, *states: dict) -> dict:
    """Encode and write one chunk for each target; ``states``: the targets' tensor states."""
    c0 = task.targets[0].ctx
    base = read_pair_base(task.base, task.base_numel, c0.start, c0.stop, c0.dtype)
    shared = {"base_crc_list": [crc32c(base[: max(0, task.base_numel - c0.start)])]}
    if c0.index == 0 and task.base is not None:
        shared["head_crc_list"] = [head_crc32c(task.base, mf.HEAD_BYTES)]
    results = {}
    for i, (t, state) in enumerate(zip(task.targets, states)):
        ctx = with_state(t.ctx, state)
        ft = read_tensor(t.ft, ctx.start, ctx.stop)
        result: dict[str, object] = {**shared, "ft_crc_list": [crc32c(ft)]}
        try:
            encoded, result["post"] = t.method.encode_with_stats(base, ft, ctx)
        except NonFinite:
            raise non_finite_error(t.method, ctx, t.ft, task.base, ft, base) from None
        del ft  # unmap the input before the (slower) compression and write
        stored = any(a.any() for a in encoded.values())
        # the CRC of each array's chunk data, as a reader decodes it (0: not stored, read as zeros)
        result["crc"] = {f"{s.role}_list": [write_chunk(t.root, t.key, s, ctx.index, encoded[s.role])
                                            if stored else 0] for s in t.arrays}
        result["stored_list"] = [stored]
        results[str(i)] = result
    return results


def _check_job(method: Method, chunk_bytes: int) -> None:
    """What an artifact can hold, refused before any I/O: a method with a stored form, chunks
    no larger than a reader accepts."""
    if chunk_bytes > mf.MAX_CHUNK_BYTES:
        raise ParameterError(f"chunk size {chunk_bytes} bytes is over the artifact format's limit of "
                             f"{mf.MAX_CHUNK_BYTES} bytes per chunk")
    if not method.compact:
        raise method.fail("has no compact form to store; use 'deltastream edit' to write the edited checkpoint "
                          "(compress takes: " + ", ".join(sorted(n for n, m in METHODS.items() if m.compact)) + ")")


def compress(base: str, fine_tune: str, out: str, method: Method, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
             seed: int = 0, policy: Policy = Policy(), overwrite: bool = False, resume: bool = False,
             options: RunOptions = RunOptions(), device: str = "cpu") -> str:
    """Write the artifact of fine_tune's delta against base to ``out``; return its path.
    ``resume`` continues a killed run of the same job from its finished chunks."""
    _check_job(method, chunk_bytes)
    base_ckpt = open_checkpoint(base)
    ft_ckpt = open_fine_tune(fine_tune, base_ckpt)
    jobs = prepare_jobs(pair_tensors(base_ckpt, ft_ckpt, chunk_bytes), method, policy, ft_ckpt)
    plan = {"compress": method.get_config(), "seed": seed, "chunk": chunk_bytes, "policy": repr(policy)}
    with job_output(out, overwrite=overwrite, inputs=[*base_ckpt.files, *ft_ckpt.files], resume=resume, plan=plan,
                    options=options) as (root, options):
        write_root_attrs(root, {})
        _compress_one(base_ckpt, root, ft_ckpt, jobs, method, policy, seed, chunk_bytes, options, device)
    return os.path.abspath(out)


def _compress_one(base_ckpt, root, ft, jobs, method, policy, seed, chunk_bytes, options, device="cpu") -> None:
    """Passes then writes, one state batch at a time (bounded memory for low rank), then the manifest."""
    entries = []
    for batch in batches(jobs):
        run_stats_passes(batch, seed, options, post=False)
        entries += _write_pass([(root, batch)], seed, options, device)[0]
    _finish(root, base_ckpt, ft, entries, method, policy, seed, chunk_bytes)


def compress_many(base: str, fine_tunes: list[str], out_dir: str, method: Method, *,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, seed: int = 0, policy: Policy = Policy(),
                  overwrite: bool = False, resume: bool = False, options: RunOptions = RunOptions(),
                  device: str = "cpu") -> list[str]:
    """One artifact per fine-tune, ``out_dir/<name>.dsz``, in one graph that reads each base chunk
    once for all of them (the cluster batch job); return their paths."""
    _check_job(method, chunk_bytes)
    base_ckpt = open_checkpoint(base)
    fts = [open_fine_tune(f, base_ckpt) for f in fine_tunes]
    names = _artifact_names(fts)
    plans = [pair_tensors(base_ckpt, ft, chunk_bytes) for ft in fts]
    job = {"compress": method.get_config(), "seed": seed, "chunk": chunk_bytes, "policy": repr(policy)}
    inputs = base_ckpt.files + [p for f in fts for p in f.files]
    with job_output(out_dir, overwrite=overwrite, inputs=inputs, resume=resume, plan=job,
                    options=options) as (folder, options):
        outputs = []
        for name, ft, plan in zip(names, fts, plans):
            root = os.path.join(folder, name)
            os.makedirs(root, exist_ok=True)
            write_root_attrs(root, {})
            outputs.append((root, ft, prepare_jobs(plan, method, policy, ft)))
        if any(j.method.lossy and j.method.pre_passes(j.plan.ft.shape) for _, _, jobs in outputs for j in jobs):
            for root, ft, jobs in outputs:  # stats passes first: one fine-tune at a time
                _compress_one(base_ckpt, root, ft, jobs, method, policy, seed, chunk_bytes, options, device)
        else:  # one write pass for all: each base chunk read once
            entries = _write_pass([(root, jobs) for root, _, jobs in outputs], seed, options, device)
            for (root, ft, _), ft_entries in zip(outputs, entries):
                _finish(root, base_ckpt, ft, ft_entries, method, policy, seed, chunk_bytes)
    return [os.path.join(os.path.abspath(out_dir), n) for n in names]


def _artifact_names(fts) -> list[str]:
    names = []
    for ft in fts:
        stem = os.path.basename(ft.path.rstrip(os.sep))
        stem = os.path.splitext(stem)[0] if stem.endswith((".json", ".safetensors")) else stem
        name, n = f"{stem}.dsz", 2
        while name in names:
            name, n = f"{stem}-{n}.dsz", n + 1
        names.append(name)
    return names


def _write_pass(outputs: list[tuple[str, list[TensorJob]]], seed: int, options: RunOptions,
                device: str = "cpu") -> list[list]:
    """The write pass of one or more artifacts, sharing each base chunk read; the manifest
    entries of each output's tensors."""
    tasks: dict[tuple[str, int, int], list[Target]] = {}
    base_of: dict[str, tuple[TensorInfo | None, int]] = {}
    targets_of: dict[str, int] = {}  # tensor name -> how many outputs have it so far
    slots: list[dict[str, int]] = []  # per output: tensor name -> its target index in that tensor's tasks
    states: list[dict | None] = []  # each tensor's state, once in the graph
    for root, jobs in outputs:
        slots.append({})
        for job in jobs:
            key = tensor_key(job.index)
            arrays = tuple(job.method.stored_arrays(job.plan.ft.dtype, job.plan.ft.shape, job.plan.chunk_elems,
                                                    job.state))
            create_arrays(root, key, list(arrays))
            base_of[job.name] = (job.plan.base, job.plan.base_numel)
            slots[-1][job.name] = targets_of.get(job.name, 0)
            targets_of[job.name] = slots[-1][job.name] + 1
            states.append(job.state)
            for chunk in job.plan.chunks():
                tasks.setdefault((job.name, chunk.start, chunk.stop), []).append(
                    Target(root, key, job.plan.ft, job.method, job.context(chunk, seed, device=device, state=False),
                           arrays, len(states) - 1))
    graph_tasks = [CompressTask(name, *base_of[name], tuple(targets)) for (name, _, _), targets in tasks.items()]
    results = run_reduce(compress_chunk, graph_tasks, group_of=lambda t: t.tensor, combine=combine_partials,
                         name="compress", options=options, total_bytes=sum(t.nbytes for t in graph_tasks),
                         bytes_of=lambda t: t.nbytes, shared=states, uses=lambda t: [x.state for x in t.targets])
    del states
    all_entries = []
    for i, (root, jobs) in enumerate(outputs):
        entries = []
        for job in jobs:
            r = results[job.name][str(slots[i][job.name])]  # a tensor's targets: the outputs that have it
            if job.method.lossy:
                job.state = job.method.finalize_post(r.get("post"), job.state)
            stored_state = {k: v for k, v in job.state.items() if not k.startswith("_")}
            state_arrays, state_crcs = write_state_arrays(root, tensor_key(job.index), stored_state)
            entries.append(_entry(job, r, stored_state, state_arrays, state_crcs))
            job.state = {}  # written: let its memory go
        all_entries.append(entries)
    return all_entries


def _finish(root, base_ckpt, ft, entries, method, policy, seed, chunk_bytes) -> None:
    """Side files, then the manifest: written last, it marks the artifact complete."""
    side_keys, side_digests = write_side_files(root, ft.side_files)
    manifest = mf.new_manifest(method=method, seed=seed, chunk_bytes=chunk_bytes, tensors=entries,
                               side_files=side_keys, side_file_digests=side_digests, ft_metadata=ft.metadata,
                               policy=policy, base_path=base_ckpt.path, ft_path=ft.path)
    write_root_attrs(root, {mf.ATTRS_KEY: manifest})
    mf.load_manifest(root)  # what readers will check, checked now: never write an artifact apply refuses


def _entry(job: TensorJob, r: dict, state: dict, state_arrays: list[str], state_crcs: dict) -> mf.TensorEntry:
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
        stored_crc32c={**{k[: -len("_list")]: v for k, v in r["crc"].items()}, **state_crcs},
    )
