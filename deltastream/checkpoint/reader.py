"""Opening a checkpoint lazily and reading chunks of its tensors as zero-copy mmap views.

A checkpoint is a single ``.safetensors`` file, a folder holding ``model.safetensors`` or a
sharded ``model.safetensors.index.json``, or such an index file itself. Opening one parses the
headers only. Each chunk read maps just that chunk's byte range, so its pages are file-backed
(reclaimable by the kernel) and released as soon as the chunk's view is dropped: peak private
memory is set by the chunk size, never by the tensor or the model.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from ..checksum import crc32c
from ..errors import CheckpointError, escape, tensor_context
from .header import MAX_HEADER_BYTES, Header, TensorInfo, load_json, open_regular, read_header
from .sidefiles import find_side_files

__all__ = ["Checkpoint", "open_checkpoint", "read_bits", "head_crc32c", "INDEX_NAME", "SINGLE_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: an index names no more tensors than their headers list, so it gets the header's bound
MAX_INDEX_BYTES = MAX_HEADER_BYTES
#: ``READS.ranges``, when a thread sets it to a list, gets (path, tensor, offset, nbytes, CRC-32C) of
#: each range read_bits maps there: the input a journaled task covered (deltastream.engine.journal)
READS = threading.local()


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint opened by its headers: tensors in storage order, metadata, side files."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    side_files: dict[str, str] = field(default_factory=dict)  # file name -> absolute path
    index: str | None = None  # the sharded index read, if any
    shards: tuple[str, ...] = ()  # every .safetensors file whose header was read

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def files(self) -> list[str]:
        """The path given and every file opened: the index, every shard, every side file (what
        an output must never overwrite, contain or sit inside)."""
        found = [self.path] + ([self.index] if self.index else []) + list(self.shards) + list(self.side_files.values())
        return list(dict.fromkeys(found))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint (file, folder or index) by reading its headers only.

    Whatever is there under a checkpoint's name is opened (lexists, not isfile), so that a FIFO,
    a device or a dangling link is refused by name rather than skipped or taken for something else.
    """
    path = os.path.abspath(os.fspath(path))
    index = None
    if os.path.isdir(path):
        folder = path
        if os.path.lexists(os.path.join(path, INDEX_NAME)):
            index = os.path.join(path, INDEX_NAME)
            headers, metadata = _read_index(index)
        elif os.path.lexists(os.path.join(path, SINGLE_NAME)):
            headers, metadata = _read_single(os.path.join(path, SINGLE_NAME))
        else:
            found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if len(found) != 1:
                what = "no .safetensors file" if not found else f"{len(found)} .safetensors files and no index"
                raise CheckpointError(f"{tensor_context(path)}: not a checkpoint folder ({what})")
            headers, metadata = _read_single(os.path.join(path, found[0]))
    elif os.path.lexists(path):
        folder = os.path.dirname(path)
        if path.endswith(".json"):
            index = path
            headers, metadata = _read_index(path)
        else:
            headers, metadata = _read_single(path)
    else:
        raise CheckpointError(f"{tensor_context(path)}: no such file or folder")

    tensors: dict[str, TensorInfo] = {}
    for header in headers:
        for info in header.tensors:
            if info.name in tensors:
                raise CheckpointError(f"{tensor_context(header.path, info.name)}: also stored in "
                                      f"'{escape(tensors[info.name].path)}'")
            tensors[info.name] = info
    return Checkpoint(path=path, tensors=tensors, metadata=metadata,
                      side_files=find_side_files(folder), index=index, shards=tuple(h.path for h in headers))


def _read_single(path: str) -> tuple[list[Header], dict[str, str]]:
    header = read_header(path)
    return [header], header.metadata


def _read_index(path: str) -> tuple[list[Header], dict[str, str]]:
    """Read a sharded index and the header of every shard it names, checking they agree."""
    with open_regular(path, MAX_INDEX_BYTES, "index") as f:
        index = load_json(path, f.read(MAX_INDEX_BYTES), "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (not isinstance(index, dict) or not isinstance(weight_map, dict)
            or not all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{tensor_context(path)}: invalid index: no 'weight_map' of tensor -> file")
    if not isinstance(index.get("metadata", {}), dict):  # transformers reads it as an object
        raise CheckpointError(f"{tensor_context(path)}: invalid index: 'metadata' is not an object")
    folder = os.path.dirname(path)
    headers = []
    for shard in dict.fromkeys(weight_map.values()):  # first-seen order, no duplicates
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{tensor_context(path)}: index names shard '{escape(shard)}' "
                                  "outside its folder")
        shard_path = os.path.join(folder, shard)
        if not os.path.lexists(shard_path):
            raise CheckpointError(f"{tensor_context(shard_path)}: shard named in the index is missing")
        headers.append(read_header(shard_path))
    by_file = {os.path.basename(h.path): {t.name for t in h.tensors} for h in headers}
    for name, shard in weight_map.items():
        if name not in by_file[shard]:
            raise CheckpointError(f"{tensor_context(os.path.join(folder, shard), name)}: "
                                  "listed in the index but not in the shard")
    for shard, names in by_file.items():
        extra = sorted(n for n in names if weight_map.get(n) != shard)
        if extra:
            raise CheckpointError(f"{tensor_context(os.path.join(folder, shard), extra[0])}: "
                                  "in the shard but not mapped to it by the index")
    return headers, headers[0].metadata if headers else {}


def read_bits(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a tensor, flat, as bit patterns, viewing a private mmap.

    The view keeps its mapping alive; dropping it unmaps the range (file-backed pages only).
    """
    count = stop - start
    if count <= 0:
        return np.empty(0, info.dtype.bits)
    itemsize = info.dtype.itemsize
    begin = info.offset + start * itemsize
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
    length = begin - aligned + count * itemsize
    try:
        with open_regular(info.path) as f:  # swapped for a FIFO since its header was read: no hang
            if os.fstat(f.fileno()).st_size < aligned + length:
                raise CheckpointError(f"{tensor_context(info.path, info.name)}: file shrank "
                                      "while being read (truncated)")
            mapped = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=aligned)
    except OSError as exc:
        raise CheckpointError(f"{tensor_context(info.path, info.name)}: cannot read: "
                              f"{exc.strerror or exc}") from None
    bits = np.frombuffer(mapped, dtype=info.dtype.bits, count=count, offset=begin - aligned)
    ranges = getattr(READS, "ranges", None)
    if ranges is not None:  # the CRC faults the pages in for the task: it costs the CRC alone
        ranges.append((info.path, info.name, begin, count * itemsize, crc32c(bits)))
    return bits


def head_crc32c(info: TensorInfo, head_bytes: int) -> int:
    """CRC of a tensor's first head_bytes: the cheap up-front check that a base is the right one."""
    count = min(info.numel, max(1, head_bytes // info.dtype.itemsize))
    return crc32c(read_bits(info, 0, count))
