"""The journal of a job: which tasks finished, with their results, so that ``--resume`` can
continue a run that was killed (``kill -9`` included) instead of starting over.

It lives in the job's partial output folder (``OUT.partial/.journal``), one folder per pass in the
order the job runs them, one small JSON file per finished task, each written under a temporary
name and renamed: a task's record is whole or absent. A task without a valid record runs again;
its output chunk is simply rewritten. ``plan.json`` fingerprints the job (inputs, method,
parameters, chunking): a partial output made by a different job is never resumed. The journal is
removed before the output is renamed into place.

A record is untrusted input: plain JSON (numpy values in a tagged encoding that round-trips
dtype, shape and bits), size-bounded, parsed with checks; one that does not parse is absent.
It also lists the input byte ranges the task read (path, tensor, offset, length, CRC-32C):
a resumed run re-checks them before it uses the result, so a resume never mixes inputs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import mmap
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checkpoint.header import MAX_HEADER_BYTES, open_regular
from ..checkpoint.reader import READS
from ..checksum import crc32c
from ..errors import CheckpointError, DeltastreamError, ParameterError, tensor_context

__all__ = ["Journal", "Entry", "journaled", "inputs_fingerprint", "encode_value", "decode_value", "parse_record"]

NAME = ".journal"
FORMAT = "deltastream-journal-1"
#: the largest record read back (a bigger one is not written: its task reruns)
MAX_RECORD_BYTES = 256 << 20
#: top-level input files hashed whole in the plan (headers only for .safetensors files)
_HASHED_BYTES = 64 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class Journal:
    def __init__(self, partial: str, plan: dict[str, Any], resume: bool, inputs: list[str]):
        self.folder = os.path.join(partial, NAME)
        # where a record's reads may lie: the inputs' folders, and the partial (the output's own files)
        self.roots = tuple(sorted({_root(p) for p in inputs} | {os.path.abspath(partial)}))
        self._seq = 0
        os.makedirs(self.folder, exist_ok=True)
        plan_path = os.path.join(self.folder, "plan.json")
        text = json.dumps(plan, sort_keys=True, default=str).encode()
        self.fingerprint = hashlib.sha256(text).hexdigest()  # the job's identity (its graph keys start with it)
        if resume and os.path.lexists(plan_path):
            if _read_bounded(plan_path, len(text)) != text:
                raise ParameterError(f"{tensor_context(partial)}: the partial output was made by a different job "
                                     "(inputs, method, parameters or chunking); run without --resume to "
                                     "start over")
        else:
            _write_file(plan_path, text)

    def pass_folder(self, name: str) -> str:
        """The folder of the next pass (passes are numbered in the order the job runs them)."""
        self._seq += 1
        folder = os.path.join(self.folder, f"{self._seq:03d}-{name}")
        os.makedirs(folder, exist_ok=True)
        return folder

    def forget(self) -> None:
        """Drop every task record: the output they describe is gone (their tasks run again)."""
        for root, _, files in os.walk(self.folder):
            for name in files:
                if root != self.folder:
                    os.remove(os.path.join(root, name))

    def entry(self, folder: str, i: int) -> Entry:
        return Entry(os.path.join(folder, f"{i}.json"), self.roots)


@dataclass(frozen=True)
class Entry:
    """Where one task's record lives, and where its reads may lie (plain data: it travels to
    distributed workers with the task)."""

    path: str
    roots: tuple[str, ...]


def journaled(fn, entry: Entry, task, *shared):
    """The graph node of a journaled task: the recorded result if its record is valid and its
    inputs unchanged; else run ``fn(task, *shared)``, recording the input ranges it reads
    (read_bits adds each with its CRC), and record it."""
    found = _load(entry)
    if found is not None:
        result, reads = found
        for path, tensor, offset, nbytes, crc in reads:
            if _range_crc(path, offset, nbytes) != crc:
                raise CheckpointError(f"{tensor_context(path, tensor)}: changed since the interrupted run; "
                                     "run without --resume to start over")
        return result
    ranges: list[tuple] = []
    READS.ranges = ranges
    try:
        result = fn(task, *shared)
    finally:
        READS.ranges = None
    reads = [list(r) for r in dict.fromkeys(ranges)]
    raw = json.dumps({"format": FORMAT, "reads": reads, "result": encode_value(result)},
                     separators=(",", ":"), allow_nan=False).encode()
    if len(raw) <= MAX_RECORD_BYTES:
        tmp = f"{entry.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        _write_file(tmp, raw)
        os.replace(tmp, entry.path)
    return result


def _range_crc(path: str, offset: int, nbytes: int) -> int | None:
    """CRC-32C of a byte range of a regular file; None when the file is not there, not
    regular, or too short."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put in place of a file never blocks
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < offset + nbytes:
            return None
        if nbytes == 0:
            return 0
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, offset - aligned + nbytes, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ,
                           offset=aligned)
        try:
            return crc32c(np.frombuffer(mapped, np.uint8, nbytes, offset - aligned))
        finally:
            mapped.close()
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _load(entry: Entry) -> tuple[Any, list] | None:
    """A task's record, parsed and checked; None when absent or invalid (the task reruns)."""
    raw = _read_bounded(entry.path, MAX_RECORD_BYTES)
    found = parse_record(raw) if raw is not None else None
    if found is None or not all(_inside(r[0], entry.roots) for r in found[1]):
        return None
    return found


def parse_record(raw: bytes) -> tuple[Any, list] | None:
    """(result, reads) of a record's bytes, or None if they are not a valid record."""
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse)
        if not isinstance(doc, dict) or doc.keys() != {"format", "reads", "result"} or doc["format"] != FORMAT:
            return None
        reads = doc["reads"]
        if not isinstance(reads, list) or not all(_is_read(r) for r in reads):
            return None
        return decode_value(doc["result"]), [tuple(r) for r in reads]
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, struct.error):
        return None


def _refuse(name: str):
    raise ValueError(f"not JSON: {name}")


def _is_read(r) -> bool:
    return (isinstance(r, list) and len(r) == 5 and all(isinstance(x, str) for x in r[:2])
            and all(type(x) is int and x >= 0 for x in r[2:]) and r[4] < 2 ** 32)


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return os.path.isabs(path) and os.path.normpath(path) == path and \
        any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


# --- plain-data encoding of task results ------------------------------------------------------
# JSON values stand for themselves, except objects: each is {tag: payload} with one tag below.
# Non-finite floats, tuples, dicts (any hashable keys), numpy scalars and arrays are tagged.

_DTYPE = re.compile(r"[<>|][biufc][1-9][0-9]?\Z")


def encode_value(v: Any) -> Any:
    """A task result as JSON-able data that :func:`decode_value` turns back into the same value."""
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            return {"objects": [list(v.shape), [encode_value(x) for x in v.ravel().tolist()]]}
        return {"array": [v.dtype.str, list(v.shape), base64.b64encode(np.ascontiguousarray(v).tobytes()).decode()]}
    if isinstance(v, np.generic):
        return {"scalar": [v.dtype.str, base64.b64encode(v.tobytes()).decode()]}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": struct.pack("<d", v).hex()}
    if isinstance(v, list):
        return [encode_value(x) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [encode_value(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[encode_value(k), encode_value(x)] for k, x in v.items()]}
    raise TypeError(f"a task result holds a {type(v).__name__}, which the journal cannot record")


def decode_value(v: Any) -> Any:
    """The value :func:`encode_value` encoded; ValueError/TypeError if ``v`` is not such data."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [decode_value(x) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise ValueError("not an encoded value")
    ((tag, payload),) = v.items()
    if tag == "tuple":
        return tuple(decode_value(x) for x in _list(payload))
    if tag == "dict":
        return {_hashable(decode_value(k)): decode_value(x) for k, x in (_pair(p) for p in _list(payload))}
    if tag == "float":
        return struct.unpack("<d", bytes.fromhex(payload))[0]
    if tag == "scalar":
        dtype, data = _pair(payload)
        return np.frombuffer(_bytes(data), _dtype(dtype), 1)[0]
    if tag == "array":
        dtype, shape, data = _list(payload, 3)
        dtype, shape, raw = _dtype(dtype), _shape(shape), _bytes(data)
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise ValueError("array data does not match its shape")
        return np.frombuffer(raw, dtype).reshape(shape).copy()
    if tag == "objects":
        shape, items = _pair(payload)
        shape, items = _shape(shape), [decode_value(x) for x in _list(items)]
        if len(items) != math.prod(shape) or not all(isinstance(x, (int, float)) for x in items):
            raise ValueError("object array items do not match its shape")
        out = np.empty(len(items), object)
        out[:] = items
        return out.reshape(shape)
    raise ValueError(f"unknown tag {tag!r}")


def _list(v, n: int | None = None) -> list:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise ValueError("malformed value")
    return v


def _pair(v) -> list:
    return _list(v, 2)


def _hashable(k):
    hash(k)
    return k


def _dtype(s) -> np.dtype:
    if not isinstance(s, str) or not _DTYPE.match(s) or np.dtype(s).str != s:
        raise ValueError(f"unsupported dtype {s!r}")
    return np.dtype(s)


def _shape(shape) -> tuple[int, ...]:
    if not all(type(d) is int and 0 <= d < 2 ** 63 for d in _list(shape)) or len(shape) > 32:
        raise ValueError("malformed shape")
    return tuple(shape)


def _bytes(data) -> bytes:
    if not isinstance(data, str):
        raise ValueError("malformed data")
    return base64.b64decode(data, validate=True)


# --- files -----------------------------------------------------------------------------------

def _read_bounded(path: str, limit: int) -> bytes | None:
    """A regular file's bytes if it holds at most ``limit`` of them (never following a link,
    never blocking on a FIFO); else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
        return raw if len(raw) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    """Write a work file of ours, never through a link; a full disk names the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None


def _root(path: str) -> str:
    path = os.path.abspath(path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def inputs_fingerprint(paths) -> list:
    """(path, size, mtime, content digest) of each input and of the files at its top level (the
    digest: of small files whole, of safetensors headers; the data is checked chunk by chunk
    through the records): a changed input invalidates a partial output."""
    entries: dict[str, None] = {}  # each file once, though an input's folder and its files are both named
    for path in paths:
        path = os.path.abspath(path)
        entries[path] = None
        if os.path.isdir(path):
            entries.update((os.path.join(path, n), None) for n in sorted(os.listdir(path)))
        elif path.endswith(".json"):  # an index: its shards too
            folder = os.path.dirname(path)
            entries.update((os.path.join(folder, n), None) for n in sorted(os.listdir(folder))
                           if n.endswith(".safetensors"))
    out = []
    for entry in entries:
        try:
            st = os.stat(entry)
        except OSError:
            continue
        regular = stat.S_ISREG(st.st_mode)
        out.append((entry, st.st_size if regular else 0, st.st_mtime_ns, _digest(entry) if regular else None))
    return out


def _digest(path: str) -> str | None:
    """sha256 of a safetensors file's header or of a small file whole; None for a big file or
    one that is not (any more) a regular file. Opened as the reader opens inputs (open_regular:
    a FIFO or device swapped in is refused, never waited on) and checked by its descriptor."""
    try:
        with open_regular(path) as f:
            if path.endswith(".safetensors"):
                n = int.from_bytes(f.read(8), "little")
                data = f.read(min(n, MAX_HEADER_BYTES))
            elif os.fstat(f.fileno()).st_size <= _HASHED_BYTES:
                data = f.read(_HASHED_BYTES + 1)
                if len(data) > _HASHED_BYTES:  # grew since: not hashed whole
                    return None
            else:
                return None
    except (OSError, DeltastreamError):
        return None
    return hashlib.sha256(data).hexdigest()
