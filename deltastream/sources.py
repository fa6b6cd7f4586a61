"""Chunk sources: "the bits of elements [start, stop) of tensor T", from wherever T lives.

Every job that reads a model reads it through one small protocol, so that an artifact is usable
wherever a checkpoint is, without a temporary rebuild on disk. A source is plain frozen data
(picklable, so it travels in a task to a cluster worker) with ``name``, ``path`` (the file a
message names), ``dtype``, ``shape`` and ``read(start, stop)`` -> the flat elements' bit patterns
(``dtype.bits``, as :func:`deltastream.checkpoint.read_bits` gives), owned by the caller.

- :class:`CheckpointSource`: a safetensors tensor; reads are zero-copy mmap views through
  ``read_bits``, so the journal's record of input ranges and their CRCs keeps working.
- :class:`ArtifactSource`: a tensor of an artifact over its base (new and grown tensors too):
  each artifact chunk overlapping [start, stop) is decoded as ``apply`` decodes it, with every
  check ``apply`` makes (the base chunk's CRC, the stored data's CRC, a lossless rebuild's CRC),
  and the range is sliced out. :meth:`ArtifactSource.decode_chunk` is the one decode path.

:func:`open_model` opens a path as a :class:`Model` of sources: a checkpoint by its headers; an
artifact folder with its base, refused (before any output exists) when the base is not the one
the artifact was made from.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from .artifact.manifest import Manifest, TensorEntry, load_manifest
from .artifact.store import chunk_file, read_chunk, valid_len
from .checkpoint import Checkpoint, TensorInfo, head_crc32c, open_checkpoint, read_bits
from .checksum import crc32c
from .dtypes import DType
from .errors import CorruptChunkError, MismatchError, WrongBaseError, escape, tensor_context
from .lora.adapter import LoraTensor, is_adapter, open_adapter
from .methods import Method, StoredArray
from .methods.base import ChunkContext
from .plan import chunk_ranges
from .scratch import scratch

__all__ = ["Readable", "Source", "CheckpointSource", "PaddedBase", "read_pair_base", "ArtifactSource", "Model",
           "open_model", "open_fine_tune", "checkpoint_model", "is_artifact", "is_adapter", "check_base",
           "artifact_sources", "read_tensor"]


class Readable(Protocol):
    """What a chunk task reads elements through: a source, or a fine-tune's padded base."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def dtype(self) -> DType: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class Source(Readable, Protocol):
    """What a job reads a model's tensor through."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def cropped(self, shape: tuple[int, ...]) -> Source: ...


@dataclass(frozen=True)
class CheckpointSource:
    """A tensor of a safetensors checkpoint."""

    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def dtype(self) -> DType:
        return self.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return read_tensor(self.info, start, stop)

    def cropped(self, shape: tuple[int, ...]) -> CheckpointSource:
        """The leading rows only (a vocabulary cropped to the base's): a prefix of the elements."""
        return CheckpointSource(replace(self.info, shape=shape, nbytes=math.prod(shape) * self.info.dtype.itemsize))


def read_tensor(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a checkpoint's tensor: a file's range (``read_bits``), or a LoRA
    adapter's weight computed over its base (:class:`deltastream.lora.adapter.LoraTensor`)."""
    if isinstance(info, LoraTensor):
        return info.read(start, stop)
    return read_bits(info, start, stop)


def read_pair_base(base: TensorInfo | None, base_numel: int, start: int, stop: int, dtype: DType) -> np.ndarray:
    """Base bits of elements [start, stop), zeros past the base's end (a grown or new tensor)."""
    have = max(0, min(stop, base_numel) - start)
    if base is not None and have == stop - start:
        return read_bits(base, start, stop)
    padded = scratch("read_pair.base", stop - start, dtype.bits)
    padded[have:] = 0
    if have and base is not None:  # without a base, base_numel is 0
        padded[:have] = read_bits(base, start, start + have)
    return padded


@dataclass(frozen=True)
class PaddedBase:
    """The base of a fine-tune's tensor, read over the fine-tune's elements: those past the base's
    end (a grown tensor), or all of them (a tensor new in the fine-tune, ``info`` None), read as 0."""

    info: TensorInfo | None
    numel: int  # the base's elements
    dtype: DType  # the fine-tune's

    @property
    def name(self) -> str:
        return self.info.name if self.info is not None else ""

    @property
    def path(self) -> str:
        return self.info.path if self.info is not None else ""

    def read(self, start: int, stop: int) -> np.ndarray:
        return read_pair_base(self.info, self.numel, start, stop, self.dtype)


_DECODED = threading.local()
#: artifact sources whose last decoded chunk one thread keeps (a merge reads a few models at once)
_DECODED_PER_THREAD = 8


@dataclass(frozen=True)
class ArtifactSource:
    """A tensor of an artifact, decoded over its base chunk by chunk (``base`` None: a tensor
    new in the fine-tune, stored against zeros). ``shape`` may be a crop of the entry's."""

    root: str
    entry: TensorEntry
    method: Method
    arrays: tuple[StoredArray, ...]
    state: dict
    seed: int
    base: TensorInfo | None
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> str:
        return self.root

    @property
    def dtype(self) -> DType:
        return self.entry.dtype

    def context(self, index: int, device: str = "cpu") -> ChunkContext:
        e = self.entry
        start = index * e.chunk_elems
        return ChunkContext(tensor=e.name, dtype=e.dtype, shape=e.shape, start=start,
                            stop=min(e.numel, start + e.chunk_elems), index=index, seed=self.seed,
                            rng_name=e.rng_name, state=self.state, device=device)

    def chunks(self) -> list[tuple[int, int]]:
        """The artifact's own chunking of the tensor: (start, stop) of chunk i."""
        return list(chunk_ranges(self.entry.numel, self.entry.chunk_elems))

    def stored(self, index: int) -> dict[str, np.ndarray]:
        """Chunk ``index``'s stored arrays, CRC-checked (format 1.1); one never written (all
        zeros) is the fill value."""
        crcs = self.entry.stored_crc32c
        if self.entry.stored_chunks[index]:
            return {s.role: read_chunk(self.root, self.entry.key, s, index, self.entry.name,
                                       crcs[s.role][index] if crcs is not None else None) for s in self.arrays}
        return {s.role: np.zeros(valid_len(s, index), s.dtype) for s in self.arrays}

    def decode_chunk(self, index: int, device: str = "cpu") -> np.ndarray:
        """The rebuilt bits of artifact chunk ``index`` (a per-thread buffer: valid until this
        thread decodes again), the base and a lossless rebuild checked against their CRCs."""
        c = self.context(index, device)
        e = self.entry
        if self.base is not None and e.base is not None:  # the base is given for entries that have one
            base = read_pair_base(self.base, e.base_numel, c.start, c.stop, c.dtype)
            if crc32c(base[: max(0, e.base_numel - c.start)]) != e.base["chunk_crc32c"][index]:
                raise WrongBaseError(f"{tensor_context(self.base.path, c.tensor)}: the base differs from the "
                                     f"one the artifact was made from (chunk {index}, elements {c.start}..{c.stop})")
        else:
            base = np.zeros(c.size, c.dtype.bits)
        out = self.method.decode(base, self.stored(index), c)
        if not self.method.lossy and crc32c(out) != e.ft_chunk_crc32c[index]:
            where = chunk_file(self.root, e.key, self.arrays[0].role, index) if self.arrays else self.root
            raise CorruptChunkError(f"{tensor_context(where, c.tensor)}: rebuilt chunk {index} does not "
                                    "match the fine-tune's checksum (corrupt or missing artifact chunk)")
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(max(0, stop - start), self.dtype.bits)
        size = self.entry.chunk_elems
        for index in range(start // size, (stop - 1) // size + 1 if stop > start else 0):
            lo = index * size
            a, b = max(start, lo), min(stop, lo + size)
            out[a - start:b - start] = self._decoded(index)[a - lo:b - lo]
        return out

    def _decoded(self, index: int) -> np.ndarray:
        """Chunk ``index`` decoded, kept per thread and source until the thread reads another
        chunk of this source: a job whose chunks are smaller than the artifact's (merge's are)
        reads one artifact chunk in several consecutive slices and decodes it once, not each time.
        Memory: one artifact chunk per worker thread and artifact tensor being read."""
        cache = _DECODED.__dict__.setdefault("chunks", {})
        held = cache.get(id(self))
        if held is None or held[0] is not self or held[1] != index:
            held = cache[id(self)] = (self, index, self.decode_chunk(index).copy())  # self: its id stays its own
            if len(cache) > _DECODED_PER_THREAD:  # the oldest other source's chunk goes
                del cache[next(k for k in cache if k != id(self))]
        return held[2]

    def cropped(self, shape: tuple[int, ...]) -> ArtifactSource:
        return replace(self, shape=shape)


@dataclass(frozen=True)
class Model:
    """A model opened as sources: its tensors in storage order, the files it was read from (what
    an output must never overwrite), its metadata and side files."""

    path: str
    tensors: dict[str, Source]
    files: list[str]
    metadata: dict[str, str]
    side_files: dict[str, str]  # name -> absolute path (a checkpoint's; an artifact's are stored inside it)
    digest: str = ""  # an artifact's manifest_sha256 (its chunks are covered by it); "" for a checkpoint


def is_artifact(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "zarr.json"))


def checkpoint_model(ckpt: Checkpoint) -> Model:
    return Model(ckpt.path, {n: CheckpointSource(i) for n, i in ckpt.tensors.items()}, ckpt.files, ckpt.metadata,
                 ckpt.side_files)


def open_fine_tune(path: str, base: Checkpoint) -> Checkpoint:
    """A fine-tune as compress and edit read it: a checkpoint, or a PEFT LoRA adapter folder
    over ``base`` (its weights computed chunk by chunk: deltastream.lora.adapter)."""
    return open_adapter(path, base) if is_adapter(path) else open_checkpoint(path)


def open_model(path: str, base: Checkpoint | None = None) -> Model:
    """A checkpoint, a PEFT LoRA adapter over ``base``, or an artifact over ``base`` (checked to
    be the artifact's base)."""
    if is_adapter(path):
        if base is None:
            raise MismatchError(f"{tensor_context(path)}: a LoRA adapter is read over its base: give the base")
        return checkpoint_model(open_adapter(path, base))
    if not is_artifact(path):
        return checkpoint_model(open_checkpoint(path))
    if base is None:
        raise MismatchError(f"{tensor_context(path)}: an artifact is read over its base: give the base")
    manifest = load_manifest(os.path.abspath(path))
    check_base(manifest, base)
    return Model(manifest.path, {s.name: s for s in artifact_sources(manifest, base)}, [manifest.path],
                 dict(manifest.doc.get("fine_tune_metadata") or {}), {}, manifest.digest)


def artifact_sources(manifest: Manifest, base: Checkpoint | None) -> list[ArtifactSource]:
    """One source per tensor, its state (state arrays included, CRC-checked) read now, before
    any output exists. Without a base (``verify`` of the artifact alone) nothing can decode."""
    seed = manifest.doc.get("seed") or 0
    out = []
    for entry in manifest.tensors:
        state = manifest.state(entry)
        binfo = base.tensors[entry.name] if base is not None and entry.base is not None else None
        out.append(ArtifactSource(manifest.path, entry, manifest.method_for(entry),
                                  tuple(manifest.arrays(entry, state)), state, seed, binfo, entry.shape))
    return out


def check_base(manifest: Manifest, base: Checkpoint) -> None:
    """Refuse a base that is not the artifact's, reading only 64 KiB per tensor."""
    expected = {t.name: t.base for t in manifest.tensors if t.base is not None}
    info: TensorInfo | None
    for name, info in base.tensors.items():
        if name not in expected:
            raise WrongBaseError(f"{tensor_context(info.path, name)}: not in the artifact's base: "
                                 f"wrong base for '{escape(manifest.path)}'")
    for name, fp in expected.items():
        info = base.tensors.get(name)
        if info is None:
            raise WrongBaseError(f"{tensor_context(base.path, name)}: missing from the base: "
                                 f"wrong base for '{escape(manifest.path)}'")
        if info.dtype.name != fp["dtype"] or list(info.shape) != fp["shape"]:
            raise WrongBaseError(f"{tensor_context(info.path, name)}: {info.dtype.name} {info.shape}, but the "
                                 f"artifact's base has {fp['dtype']} {tuple(fp['shape'])}: wrong base")
        if head_crc32c(info, manifest.doc["head_bytes"]) != fp["head_crc32c"]:
            raise WrongBaseError(f"{tensor_context(info.path, name)}: contents differ from the artifact's "
                                 f"base: wrong base for '{escape(manifest.path)}'")
