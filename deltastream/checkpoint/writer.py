"""A streaming safetensors writer: headers first, then each chunk written in place.

Shapes and dtypes of every output tensor are known from the plan, so each shard's header (and
so every tensor's byte offset) is fixed before any data exists. ``create`` checks the disk has
room (a full disk fails here, before the heavy work), writes the headers and sizes each shard;
tasks then ``pwrite`` their chunks at known offsets, in any order and from any process that
sees the folder, and nothing is ever buffered beyond one chunk. Sharding and file names follow
Hugging Face (``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from ..dtypes import DTYPES
from ..errors import DeltastreamError, tensor_context
from ..units import format_size
from .reader import INDEX_NAME, SINGLE_NAME

__all__ = ["OutputTensor", "CheckpointWriter", "DiskFullError", "FULL_ERRNOS", "plan_shards", "write_at", "shard_name",
           "free_space", "space_note"]

_WRITE = os.O_WRONLY | os.O_NOFOLLOW


def _writeback_starter():
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk without
    waiting. Each chunk's bytes go to disk while the next chunks compute, so the fsync that makes
    the output durable before its rename finds little left to do (benchmarks/bench_durability.py,
    "apply: sync, no per-chunk writeback"). None elsewhere."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_START_WRITEBACK = _writeback_starter()


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Start writing bytes [offset, offset + nbytes) of an open file to disk (0: to its end)."""
    if _START_WRITEBACK is not None:
        _START_WRITEBACK(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE
#: the errors of a full disk (or quota)
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will hold: name, safetensors dtype string, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def shard_name(i: int, n: int) -> str:
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most max_shard_size bytes (a bigger tensor alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    doc: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


class CheckpointWriter:
    """Lays out a sharded checkpoint in a folder and tells tasks where each tensor's bytes go."""

    def __init__(self, folder: str, tensors: list[OutputTensor], max_shard_size: int,
                 metadata: dict[str, str] | None = None):
        self.folder = folder
        self.metadata = dict(metadata or {})
        self.metadata.pop("format", None)
        self.shards = plan_shards(tensors, max_shard_size)
        self._where: dict[str, tuple[str, int]] = {}
        self._headers: list[bytes] = []
        for i, shard in enumerate(self.shards):
            header = _header_bytes(shard, self.metadata)
            self._headers.append(header)
            offset = len(header)
            path = os.path.join(folder, shard_name(i, len(self.shards)))
            for t in shard:
                self._where[t.name] = (path, offset)
                offset += t.nbytes

    def location(self, name: str) -> tuple[str, int]:
        """(file path, absolute offset) of a tensor's first byte."""
        return self._where[name]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard)

    def create(self, keep_existing: bool = False, journal=None) -> None:
        """Check the disk has room, write every shard's header and size it, write the index.

        ``keep_existing`` (a resumed job): a shard already there with this header and size keeps
        the data the earlier run wrote; one that is not (gone, or replaced) is made anew, and the
        job's ``journal`` then forgets its finished tasks, whose data it no longer holds.
        """
        n = len(self.shards)
        _check_free_space(self.folder, sum(len(h) for h in self._headers) + self.total_size)
        forgotten = False
        for i, (shard, header) in enumerate(zip(self.shards, self._headers)):
            path = os.path.join(self.folder, shard_name(i, n))
            size = len(header) + sum(t.nbytes for t in shard)
            if keep_existing and _has_header(path, header, size):
                continue
            if keep_existing and journal is not None and not forgotten:
                journal.forget()  # once: every record is gone after the first
                forgotten = True
            try:  # never through a link: the folder is this run's, and so is every file in it
                with open(os.open(path, _WRITE | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
                    f.write(header)
                    f.truncate(size)  # sparse until the tasks write; see _check_free_space
            except OSError as exc:
                raise _full(exc, path) or DeltastreamError(f"{tensor_context(path)}: cannot create output: "
                                                           f"{exc.strerror or exc}") from None
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {t.name: shard_name(i, n) for i, shard in enumerate(self.shards) for t in shard},
            }
            with open(os.path.join(self.folder, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, ensure_ascii=False)
                f.write("\n")


def _has_header(path: str, header: bytes, size: int) -> bool:
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size == size and f.read(len(header)) == header
    except OSError:
        return False


def free_space(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def space_note(needed: int, free: int) -> str:
    """How a full disk is told, up front here and mid-run (deltastream.engine.atomic) alike."""
    return f"{format_size(needed)} needed, {format_size(free)} free"


class DiskFullError(DeltastreamError, OSError):
    """A write hit a full disk; the job's output adds how much space it needs."""


def _check_free_space(folder: str, needed: int) -> None:
    """Fail before the heavy work when the disk cannot hold the output.

    Not posix_fallocate: reserving brought no measurable speed here (benchmarks/micro.py; page-cache
    writes vary 3-10x from run to run with the kernel's writeback of earlier runs, whichever comes
    first), and it costs a full pass of extent allocation. A disk that fills up during the run still fails cleanly,
    at the write that hits it: the OSError, named, goes up to the job's output, which says the same.
    """
    free = free_space(folder)
    if free < needed:
        raise DeltastreamError(f"{tensor_context(folder)}: not enough disk space for the output "
                               f"({space_note(needed, free)})")


def _full(exc: OSError, path: str, tensor: str | None = None) -> DiskFullError | None:
    """A full disk's error, naming the file and tensor; None for other errors."""
    if exc.errno not in FULL_ERRNOS:
        return None
    return DiskFullError(f"{tensor_context(path, tensor)}: cannot write output: {exc.strerror}")


def write_at(path: str, offset: int, data: np.ndarray, tensor: str = "") -> None:
    """Write an array's bytes at an absolute file offset (called from tasks, any process)."""
    view = memoryview(np.ascontiguousarray(data)).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer; numpy declares __buffer__ only for Python >= 3.12
    try:
        fd = os.open(path, _WRITE)
        try:
            start = offset
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
            start_writeback(fd, start, offset - start)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _full(exc, path, tensor or None) or DeltastreamError(
            f"{tensor_context(path, tensor or None)}: cannot write output: {exc.strerror or exc}") from None
