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

import json
import os
from dataclasses import dataclass

from ..artifact.manifest import Manifest, load_manifest
from ..checkpoint import CheckpointWriter, OutputTensor, open_checkpoint
from ..checkpoint.writer import write_at
from ..engine import RunOptions, job_output, run_tasks
from ..sources import ArtifactSource, artifact_sources, check_base, is_adapter

__all__ = ["apply", "verify", "RebuildTask", "rebuild_chunk", "check_chunk", "check_base", "provenance",
           "DEFAULT_MAX_SHARD"]

DEFAULT_MAX_SHARD = 5 * 10**9  # Hugging Face's default


@dataclass(frozen=True)
class RebuildTask:
    """One artifact chunk to decode. Its source (the tensor's manifest entry, per-chunk checksums
    and state: lowrank's factors are megabytes) is a node of the graph that the task refers to by
    ``source`` (its index), sent to a worker once rather than inside every task."""

    source: int
    index: int  # the artifact chunk
    nbytes: int
    device: str
    out_path: str | None  # None: verify only
    out_offset: int


def rebuild_chunk(task: RebuildTask, source: ArtifactSource) -> dict:
    """Decode one artifact chunk (every check made) and write it in place, or only check it."""
    out = source.decode_chunk(task.index, task.device)
    if task.out_path is not None:
        start = task.index * source.entry.chunk_elems
        write_at(task.out_path, task.out_offset + start * out.itemsize, out, source.name)
    return {}


def check_chunk(task: RebuildTask, source: ArtifactSource) -> dict:
    """verify without a base: a stored chunk must exist, decode and match its checksums (read_chunk
    reports a missing one)."""
    source.stored(task.index)
    return {}


def provenance(manifest: Manifest) -> dict[str, str]:
    """The rebuilt checkpoint's safetensors metadata: the fine-tune's own and, for a lossy
    artifact, what made it (the method, its parameters as JSON, the seed, the artifact's
    manifest_sha256), so an edited model is never taken for the original. A lossless rebuild is
    the fine-tune, metadata included: nothing is added."""
    own = dict(manifest.doc.get("fine_tune_metadata") or {})
    if not manifest.method.lossy:
        return own
    return {**own, "deltastream_method": manifest.method.method_id,
            "deltastream_params": json.dumps(manifest.method.get_config(), sort_keys=True),
            "deltastream_seed": str(manifest.doc.get("seed") or 0), "deltastream_artifact": manifest.digest}


def _tasks(sources: list[ArtifactSource], where=None, device: str = "cpu") -> list[RebuildTask]:
    """Every chunk of every source, in order: apply copies each source's chunks into the writer."""
    tasks = []
    for k, source in enumerate(sources):
        out_path, out_offset = where(source.name) if where else (None, 0)
        tasks += [RebuildTask(k, i, source.context(i).size * source.dtype.itemsize, device, out_path, out_offset)
                  for i in range(len(source.chunks()))]
    return tasks


def _run(fn, sources: list[ArtifactSource], name: str, options: RunOptions, where=None, device: str = "cpu") -> None:
    run_tasks(fn, _tasks(sources, where, device), name=name, options=options,
              total_bytes=sum(s.entry.nbytes for s in sources), bytes_of=lambda t: t.nbytes, shared=sources,
              uses=lambda t: (t.source,))


def apply(base: str, artifact: str, out: str, *, max_shard_size: int = DEFAULT_MAX_SHARD,
          overwrite: bool = False, resume: bool = False, options: RunOptions = RunOptions(),
          device: str = "cpu") -> str:
    """Rebuild the fine-tune into the checkpoint folder ``out``; return its path. ``device`` "cuda"
    decodes the chunks of dare and 1-bit bitdelta tensors on the GPU (the same bits). A PEFT LoRA
    adapter folder in place of the artifact is merged into the base (deltastream.lora.adapter)."""
    if is_adapter(artifact):
        from ..methods.lossless import Lossless
        from .edit import edit

        return edit(base, artifact, out, Lossless(), max_shard_size=max_shard_size, overwrite=overwrite,
                    resume=resume, options=options)[0]
    manifest = load_manifest(os.path.abspath(artifact))
    base_ckpt = open_checkpoint(base)
    check_base(manifest, base_ckpt)
    sources = artifact_sources(manifest, base_ckpt)
    outputs = [OutputTensor(e.name, e.dtype.name, e.shape) for e in manifest.tensors]
    plan = {"apply": manifest.digest, "shard": max_shard_size}
    with job_output(out, overwrite=overwrite, inputs=[*base_ckpt.files, manifest.path], resume=resume, plan=plan,
                    options=options, needed=sum(o.nbytes for o in outputs)) as (folder, options):
        writer = CheckpointWriter(folder, outputs, max_shard_size, provenance(manifest))
        writer.create(keep_existing=resume, journal=options.journal)
        for name in manifest.side_files:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(manifest.read_side_file(name))  # names checked on load
        _run(rebuild_chunk, sources, "apply", options, writer.location, device)
    return os.path.abspath(out)


def verify(artifact: str, base: str | None = None, *, options: RunOptions = RunOptions()) -> Manifest:
    """Check an artifact's integrity (manifest, side files, every stored chunk's CRC-32C); with a
    base, also that it is the right base and that every chunk decodes, an exact tensor to the
    fine-tune's recorded checksums (a lossy one has none to match). Raises on the first problem."""
    manifest = load_manifest(os.path.abspath(artifact))
    for name in manifest.side_files:
        manifest.read_side_file(name)
    if base is not None:
        base_ckpt = open_checkpoint(base)
        check_base(manifest, base_ckpt)
        _run(rebuild_chunk, artifact_sources(manifest, base_ckpt), "verify", options)
    else:
        _run(check_chunk, artifact_sources(manifest, None), "verify", options)
    return manifest
