"""The manifest: the artifact's versioned description, stored in the root group's attributes.

It is written last, once every chunk is on disk, and only then is the artifact renamed into
place, so a manifest with ``"complete": true`` means the artifact is whole. Readers refuse a
format they do not know or a major version newer than theirs.

An artifact is untrusted input: :func:`load_manifest` checks every field (type, range, and
consistency with the chunking, the method's plan and each array's own zarr metadata) before any
job uses it, and from format 1.1 the manifest carries a sha256 of itself, so a changed manifest
is reported rather than obeyed. Every stored chunk's data has a CRC-32C in the manifest (lossy
tensors too), every side file a sha256.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..checkpoint.sidefiles import MAX_SIDE_FILE_BYTES, is_side_file
from ..dtypes import DType, dtype_by_name
from ..errors import ArtifactError, DeltastreamError, escape, tensor_context
from ..methods import Method, StoredArray, method_from_config
from ..methods.lossless import Lossless
from ..policy import GROWN, LOSSLESS, NEW
from .fields import U32
from .fields import Bad as _Bad
from .fields import as_dict as _dict
from .fields import as_list as _list
from .fields import crcs as _crcs
from .fields import get as _get
from .fields import integer as _integer
from .fields import need as _need
from .fields import number as _number
from .fields import shape as _shape
from .fields import show as _show
from .fields import string as _string
from .fields import strings as _strings
from .layout import layout_difference
from .store import read_root_attrs, read_side_file, read_state_arrays, recorded_array, side_file_size, tensor_key

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ATTRS_KEY", "TensorEntry", "Manifest", "load_manifest",
           "new_manifest", "manifest_digest", "MAX_TENSOR_BYTES", "MAX_CHUNK_BYTES"]

FORMAT_NAME = "deltastream"
FORMAT_VERSION = "1.1"  # major.minor: a reader accepts any minor of its major
ATTRS_KEY = "deltastream"
DIGEST_KEY = "manifest_sha256"
#: bytes of each base tensor hashed up front, so a wrong base is refused before any output
HEAD_BYTES = 1 << 16
#: the largest tensor an artifact may describe (the largest real ones are a few GB)
MAX_TENSOR_BYTES = 1 << 40
#: the largest chunk: every buffer a task allocates is a few chunks
MAX_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the manifest records it."""

    name: str
    key: str
    dtype: DType
    shape: tuple[int, ...]
    policy: str
    chunk_elems: int
    base: dict[str, Any] | None  # dtype, shape, head_crc32c, chunk_crc32c; None: new tensor
    ft_chunk_crc32c: list[int]
    stored_chunks: list[bool]
    rng_name: str = ""
    state: dict[str, Any] = field(default_factory=dict)  # the method's per-tensor figures (JSON)
    state_arrays: list[str] = field(default_factory=list)  # ... and those stored as arrays
    stored_crc32c: dict[str, list[int]] | None = None  # role -> CRC-32C per chunk; None: format 1.0

    @property
    def base_numel(self) -> int:
        return math.prod(self.base["shape"]) if self.base is not None else 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "key": self.key, "dtype": self.dtype.name, "shape": list(self.shape),
            "policy": self.policy, "chunk_elems": self.chunk_elems, "base": self.base,
            "ft_chunk_crc32c": self.ft_chunk_crc32c, "stored_chunks": self.stored_chunks,
            "rng_name": self.rng_name, "state": self.state, "state_arrays": self.state_arrays,
            "stored_crc32c": self.stored_crc32c,
        }


@dataclass(frozen=True)
class Manifest:
    path: str
    doc: dict[str, Any]
    method: Method
    tensors: list[TensorEntry]
    digest: str  # sha256 of the manifest (manifest_digest): what a user pins
    layouts: dict[str, tuple[StoredArray, ...]] = field(default_factory=dict)  # key -> arrays as recorded
    minor: int = int(FORMAT_VERSION.split(".")[1])  # format 1.0 (0): no 1.1 checksum is read, present or not

    def method_for(self, entry: TensorEntry) -> Method:
        """The run's method for tensors under it; exact storage for the others."""
        return self.method if entry.policy == self.method.method_id else Lossless()

    def state(self, entry: TensorEntry) -> dict[str, Any]:
        """The tensor's full state: its JSON figures and its state arrays (of the declared
        shapes, checked against their CRCs)."""
        shapes = {k: s for k, (kind, s) in self.method_for(entry).state_layout(entry.shape).items() if kind == "array"}
        return {**entry.state, **read_state_arrays(self.path, entry.key, shapes, entry.stored_crc32c, entry.name)}

    def planned_arrays(self, entry: TensorEntry, state: dict[str, Any] | None = None) -> list[StoredArray]:
        """The arrays this version's method plans for the tensor (``state``: its full state)."""
        state = entry.state if state is None else state
        return self.method_for(entry).stored_arrays(entry.dtype, entry.shape, entry.chunk_elems, state)

    def arrays(self, entry: TensorEntry, state: dict[str, Any] | None = None) -> list[StoredArray]:
        """The tensor's arrays with the layout the artifact records (load_manifest read it),
        which must still be the method's plan for the full ``state``."""
        recorded, planned = list(self.layouts[entry.key]), self.planned_arrays(entry, state)
        if [s.role for s in recorded] != [p.role for p in planned] or any(map(layout_difference, recorded, planned)):
            raise ArtifactError(f"{tensor_context(self.path, entry.name)}: the arrays the artifact records are not "
                                "those its method plans for the tensor's state")
        return recorded

    @property
    def side_files(self) -> dict[str, str]:
        return dict(self.doc.get("side_files", {}))

    def read_side_file(self, name: str) -> bytes:
        """A side file's bytes, checked against its recorded size and sha256 (format 1.1; a 1.0
        manifest's ``side_file_digests``, unchecked, is ignored like its other 1.1 fields)."""
        key = self.side_files[name]
        digest = self.doc["side_file_digests"][name] if self.minor >= 1 else None
        if digest is None:  # format 1.0: the size from its own metadata, bounded
            return read_side_file(self.path, key, name, side_file_size(self.path, key, name, MAX_SIDE_FILE_BYTES))
        return read_side_file(self.path, key, name, digest["bytes"], digest["sha256"])

    @property
    def ft_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def manifest_digest(doc: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its own digest field (keys
    sorted, no spaces, ASCII with \\u escapes): what format 1.1 stores as manifest_sha256."""
    body = {k: v for k, v in doc.items() if k != DIGEST_KEY}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(raw.encode("ascii")).hexdigest()


def new_manifest(*, method: Method, seed: int, chunk_bytes: int, tensors: list[TensorEntry],
                 side_files: dict[str, str], side_file_digests: dict[str, dict], ft_metadata: dict[str, str],
                 policy: Any, base_path: str, ft_path: str) -> dict[str, Any]:
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": True,
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": method.get_config(),
        "seed": seed,
        "policy": {"include": list(policy.include), "exclude": list(policy.exclude)},
        "chunk_bytes": chunk_bytes,
        "head_bytes": HEAD_BYTES,
        "source": {"base": base_path, "fine_tune": ft_path},
        "fine_tune_metadata": ft_metadata,
        "side_files": side_files,
        "side_file_digests": side_file_digests,
        "tensors": [t.to_json() for t in tensors],
    }
    return {**doc, DIGEST_KEY: manifest_digest(doc)}


def load_manifest(path: str) -> Manifest:
    """Read and check an artifact's manifest, and every array's metadata against it (no chunk
    data is read). Any problem is one ArtifactError naming the file and tensor."""
    doc = read_root_attrs(path).get(ATTRS_KEY)
    where = os.path.join(path, "zarr.json")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ArtifactError(f"file '{escape(path)}': not a deltastream artifact (no manifest)")
    version = doc.get("format_version")
    match = re.fullmatch(r"([0-9]{1,4})\.([0-9]{1,4})", version) if isinstance(version, str) else None
    if match is None or match.group(1) != FORMAT_VERSION.split(".")[0]:
        raise ArtifactError(f"file '{escape(path)}': artifact format version {escape(version)[:40]} is not supported "
                            f"(this is deltastream {__version__}, format {FORMAT_VERSION})")
    if doc.get("complete") is not True:
        raise ArtifactError(f"file '{escape(path)}': artifact is incomplete (its writing was interrupted)")
    minor = int(match.group(2))
    try:
        digest = manifest_digest(doc)
    except ValueError:  # a non-finite number: the field checks below name it
        digest = None
    if minor >= 1 and digest is not None and doc.get(DIGEST_KEY) != digest:
        raise ArtifactError(f"file '{escape(where)}': the manifest does not match its manifest_sha256: it was "
                            "modified or corrupted after it was written")
    try:
        method = _method(doc)
        tensors = _tensors(doc, method, minor)
        _document(doc, minor)
        manifest = Manifest(path=path, doc=doc, method=method, tensors=tensors, digest=digest or "", minor=minor)
        if digest is None:
            raise _Bad("holds a non-finite number")
    except _Bad as exc:
        raise ArtifactError(f"{tensor_context(where, exc.tensor)}: malformed manifest: {exc}") from None
    for entry in tensors:
        owner = f"tensor '{escape(entry.name)}'"
        manifest.layouts[entry.key] = tuple(recorded_array(path, entry.key, spec, owner)
                                            for spec in manifest.planned_arrays(entry))
    return manifest


def _method(doc: dict) -> Method:
    config = _dict(_get(doc, "method"), "method")
    _string(_get(config, "id", "method."), "method.id")
    try:
        method = method_from_config(config)
    except (DeltastreamError, TypeError, ValueError) as exc:
        raise _Bad(f"'method': {exc}") from None
    _need(method.compact, f"'method' is '{escape(method.method_id)}', which has no stored form")
    return method


def _document(doc: dict, minor: int) -> None:
    """The fields about the whole artifact (the tensors are checked by _tensors)."""
    _string(_get(doc, "library_version"), "library_version")
    _string(_get(doc, "created"), "created")
    seed = _get(doc, "seed")
    if not (seed is None or type(seed) is int and -2**63 <= seed < 2**64):
        raise _Bad(f"'seed' is {_show(seed)}, not an integer")
    policy = _dict(_get(doc, "policy"), "policy")
    for key in ("include", "exclude"):
        _strings(_get(policy, key, "policy."), f"policy.{key}")
    _integer(_get(doc, "chunk_bytes"), "chunk_bytes", 1, 2**63 - 1)
    _integer(_get(doc, "head_bytes"), "head_bytes", 1, 2**31)
    source = _dict(_get(doc, "source"), "source")
    for key in ("base", "fine_tune"):
        _string(_get(source, key, "source."), f"source.{key}")
    for key, value in _dict(_get(doc, "fine_tune_metadata"), "fine_tune_metadata").items():
        _string(key, "fine_tune_metadata key")
        _string(value, f"fine_tune_metadata.{escape(key)}")
    side_files = _dict(_get(doc, "side_files"), "side_files")
    keys = set()
    for name, key in side_files.items():
        _need(is_side_file(_string(name, "side_files key")), f"side file name '{escape(name)}' is not a side file")
        if not (isinstance(key, str) and re.fullmatch(r"sidefiles/[0-9]{3,6}", key) is not None and key not in keys):
            raise _Bad(f"side file '{escape(name)}' has an invalid or repeated key {_show(key)}")
        keys.add(key)
    if minor >= 1:
        digests = _dict(_get(doc, "side_file_digests"), "side_file_digests")
        _need(set(digests) == set(side_files), "'side_file_digests' does not name the same files as 'side_files'")
        for name, digest in digests.items():
            what = f"side_file_digests.{escape(name)}"
            _integer(_get(_dict(digest, what), "bytes", what + "."), what + ".bytes", 0, MAX_SIDE_FILE_BYTES)
            sha = _string(_get(digest, "sha256", what + "."), what + ".sha256")
            _need(re.fullmatch(r"[0-9a-f]{64}", sha) is not None, f"'{what}.sha256' is not a sha256 hex digest")


def _tensors(doc: dict, method: Method, minor: int) -> list[TensorEntry]:
    # the id the artifact was written under: a legacy config read as another method (bitdelta
    # with bits >= 1 is now multibit) names its tensors' policy by the old id
    recorded = doc["method"]["id"]
    entries, names = [], set()
    for i, t in enumerate(_list(_get(doc, "tensors"), "tensors")):
        name = _string(_get(_dict(t, f"tensors[{i}]"), "name", f"tensors[{i}]."), f"tensors[{i}].name")
        try:
            _need(name not in names, "the name is repeated")
            _need(name != "__metadata__", "the name '__metadata__' is safetensors' own key")
            entries.append(_entry(i, t, method, minor, recorded))
        except _Bad as exc:
            raise _Bad(str(exc), tensor=name) from None
        names.add(name)
    return entries


def _entry(i: int, t: dict, method: Method, minor: int, recorded: str) -> TensorEntry:
    if t.get("key") != tensor_key(i):
        raise _Bad(f"'key' is {_show(t.get('key'))}, expected '{tensor_key(i)}'")
    dtype = dtype_by_name(_string(_get(t, "dtype"), "dtype"))
    if dtype is None:
        raise _Bad(f"'dtype' {_show(t['dtype'])} is not a safetensors dtype")
    shape = _shape(_get(t, "shape"), "shape")
    numel = math.prod(shape)
    _need(numel * dtype.itemsize <= MAX_TENSOR_BYTES, f"'shape' {list(shape)} is over {MAX_TENSOR_BYTES} bytes")
    policy = _string(_get(t, "policy"), "policy")
    policy = method.method_id if policy == recorded else policy
    policies = list(dict.fromkeys((method.method_id, LOSSLESS, NEW, GROWN)))
    _need(policy in policies, f"'policy' '{escape(policy)}' is not one of " + ", ".join(f"'{p}'" for p in policies))
    tensor_method = method if policy == method.method_id else Lossless()
    _need(not tensor_method.lossy or dtype.computable and tensor_method.accepts(shape),
          f"method '{method.method_id}' cannot encode a {dtype.name} tensor of shape {list(shape)}")
    chunk_elems = _chunking(_get(t, "chunk_elems"), shape, dtype)
    n = max(1, math.ceil(numel / chunk_elems))
    base = _base(_get(t, "base"), policy, dtype, shape, n)
    ft_crcs = _crcs(_get(t, "ft_chunk_crc32c"), "ft_chunk_crc32c", n)
    stored = _list(_get(t, "stored_chunks"), "stored_chunks", n)
    _need(all(type(s) is bool for s in stored), "'stored_chunks' holds a value that is not true or false")
    rng_name = _string(t.get("rng_name", ""), "rng_name")
    layout = tensor_method.state_layout(shape)
    for role, (kind, dims) in layout.items():  # read whole, up front: one chunk, bounded as any chunk
        nbytes = math.prod(dims) * 4
        _need(kind != "array" or nbytes <= MAX_CHUNK_BYTES, f"state array '{role}' of shape {list(dims)} is "
              f"{nbytes} bytes, over the {MAX_CHUNK_BYTES}-byte limit of a chunk")
    state = _state(_dict(t.get("state", {}), "state"), layout)
    state_arrays = _strings(t.get("state_arrays", []), "state_arrays")
    arrays = sorted(k for k, (kind, _) in layout.items() if kind == "array")
    if sorted(state_arrays) != arrays:
        raise _Bad(f"'state_arrays' is {_show(state_arrays)}, expected {_show(arrays)}")
    stored_crcs = None
    if minor >= 1:
        stored_crcs = _dict(_get(t, "stored_crc32c"), "stored_crc32c")
        lengths = {s.role: n for s in tensor_method.stored_arrays(dtype, shape, chunk_elems, state)}
        lengths.update({f"state.{a}": 1 for a in arrays})
        if set(stored_crcs) != set(lengths):
            raise _Bad(f"'stored_crc32c' names {_show(sorted(stored_crcs))}, expected {_show(sorted(lengths))}")
        for role, length in lengths.items():
            _crcs(stored_crcs[role], f"stored_crc32c.{role}", length)
    return TensorEntry(name=t["name"], key=t["key"], dtype=dtype, shape=shape, policy=policy, chunk_elems=chunk_elems,
                       base=base, ft_chunk_crc32c=ft_crcs, stored_chunks=stored, rng_name=rng_name, state=state,
                       state_arrays=state_arrays, stored_crc32c=stored_crcs)


def _chunking(value: Any, shape: tuple[int, ...], dtype: DType) -> int:
    """chunk_elems as compress chooses it (plan.chunk_elements): 1 to numel elements, of at
    most MAX_CHUNK_BYTES, whole rows when a row fits."""
    numel = math.prod(shape)
    chunk_elems = _integer(value, "chunk_elems", 1, max(1, min(numel, MAX_CHUNK_BYTES // dtype.itemsize)))
    row = shape[-1] if len(shape) >= 2 else 1
    _need(not 0 < row <= chunk_elems or chunk_elems % row == 0 or chunk_elems == numel,
          f"'chunk_elems' {chunk_elems} cuts rows of {row} elements")
    return chunk_elems


def _base(base: Any, policy: str, dtype: DType, shape: tuple[int, ...], n: int) -> dict | None:
    _need((base is None) == (policy == NEW), f"'base' is {'null' if base is None else 'given'} for policy '{policy}'")
    if base is None:
        return None
    _dict(base, "base")
    if _get(base, "dtype", "base.") != dtype.name:
        raise _Bad(f"'base.dtype' {_show(base['dtype'])} is not {dtype.name}")
    base_shape = _shape(_get(base, "shape", "base."), "base.shape")
    grown = (len(shape) >= 1 and len(base_shape) == len(shape) and base_shape[1:] == shape[1:]
             and base_shape[0] < shape[0])
    _need(grown if policy == GROWN else base_shape == shape,
          f"'base.shape' {list(base_shape)} does not fit shape {list(shape)} and policy '{policy}'")
    _integer(_get(base, "head_crc32c", "base."), "base.head_crc32c", 0, U32)
    _crcs(_get(base, "chunk_crc32c", "base."), "base.chunk_crc32c", n)
    return base


def _state(state: dict, layout: dict[str, tuple[str, tuple[int, ...]]]) -> dict:
    """The JSON state must be exactly the method's declared values, of their kinds."""
    expected = {k: v for k, v in layout.items() if v[0] != "array"}
    if set(state) != set(expected):
        raise _Bad(f"'state' has {_show(sorted(state))}, expected {_show(sorted(expected))}")
    for key, (kind, shape) in expected.items():
        if kind == "int":
            _integer(state[key], f"state.{key}", 0, 2**31)
        elif kind == "number":
            _number(state[key], f"state.{key}")
        else:
            for j, v in enumerate(_list(state[key], f"state.{key}", shape[0])):
                _number(v, f"state.{key}[{j}]")
    return state
