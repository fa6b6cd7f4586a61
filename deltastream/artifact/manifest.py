"""The manifest: the artifact's versioned description, stored in the root group's attributes.

It is written last, once every chunk is on disk, and only then is the artifact renamed into
place, so a manifest with ``"complete": true`` means the artifact is whole. Readers refuse a
format they do not know or a major version newer than theirs.
"""

from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..checkpoint.sidefiles import is_side_file
from ..dtypes import DType, dtype_by_name
from ..errors import ArtifactError, DeltastreamError
from ..methods import Method, StoredArray, method_from_config
from ..methods.lossless import Lossless
from .store import read_root_attrs, read_state_arrays

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ATTRS_KEY", "TensorEntry", "Manifest", "load_manifest",
           "new_manifest"]

FORMAT_NAME = "deltastream"
FORMAT_VERSION = "1.0"  # major.minor: a reader accepts any minor of its major
ATTRS_KEY = "deltastream"
#: bytes of each base tensor hashed up front, so a wrong base is refused before any output
HEAD_BYTES = 1 << 16


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
        }


@dataclass(frozen=True)
class Manifest:
    path: str
    doc: dict[str, Any]
    method: Method
    tensors: list[TensorEntry]

    def method_for(self, entry: TensorEntry) -> Method:
        """The run's method for tensors under it; exact storage for the others."""
        return self.method if entry.policy == self.method.method_id else Lossless()

    def state(self, entry: TensorEntry) -> dict[str, Any]:
        """The tensor's full state: its JSON figures and its state arrays."""
        return {**entry.state, **read_state_arrays(self.path, entry.key, entry.state_arrays)}

    def arrays(self, entry: TensorEntry, state: dict[str, Any] | None = None) -> list[StoredArray]:
        state = self.state(entry) if state is None else state
        return self.method_for(entry).stored_arrays(entry.dtype, entry.shape, entry.chunk_elems, state)

    @property
    def side_files(self) -> dict[str, str]:
        return dict(self.doc.get("side_files", {}))

    @property
    def ft_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def new_manifest(*, method: Method, seed: int, chunk_bytes: int, tensors: list[TensorEntry],
                 side_files: dict[str, str], ft_metadata: dict[str, str], policy: Any, base_path: str,
                 ft_path: str) -> dict[str, Any]:
    return {
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
        "tensors": [t.to_json() for t in tensors],
    }


def load_manifest(path: str) -> Manifest:
    """Read and check an artifact's manifest (no chunk data is read)."""
    doc = read_root_attrs(path).get(ATTRS_KEY)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ArtifactError(f"file '{path}': not a deltastream artifact (no manifest)")
    version = str(doc.get("format_version", ""))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise ArtifactError(f"file '{path}': artifact format version {version} is not supported "
                            f"(this is deltastream {__version__}, format {FORMAT_VERSION})")
    if doc.get("complete") is not True:
        raise ArtifactError(f"file '{path}': artifact is incomplete (its writing was interrupted)")
    try:
        method = method_from_config(doc["method"])
        tensors = [_entry(t) for t in doc["tensors"]]
        for name, key in doc.get("side_files", {}).items():
            if not is_side_file(name) or not re.fullmatch(r"sidefiles/[0-9]+", key):
                raise ValueError(f"invalid side file entry {name!r}: {key!r}")
    except (KeyError, TypeError, ValueError, DeltastreamError) as exc:
        raise ArtifactError(f"file '{path}': malformed manifest ({exc.__class__.__name__}: {exc})") from None
    return Manifest(path=path, doc=doc, method=method, tensors=tensors)


def _entry(t: dict[str, Any]) -> TensorEntry:
    dtype = dtype_by_name(t["dtype"])
    if dtype is None:
        raise ValueError(f"unknown dtype {t['dtype']!r} for tensor {t['name']!r}")
    if not str(t["key"]).startswith("tensors/") or ".." in str(t["key"]):
        raise ValueError(f"tensor {t['name']!r} has an invalid key {t['key']!r}")
    return TensorEntry(name=t["name"], key=t["key"], dtype=dtype, shape=tuple(t["shape"]),
                       policy=t["policy"], chunk_elems=int(t["chunk_elems"]), base=t["base"],
                       ft_chunk_crc32c=list(t["ft_chunk_crc32c"]), stored_chunks=list(t["stored_chunks"]),
                       rng_name=t.get("rng_name", ""), state=dict(t.get("state", {})),
                       state_arrays=[str(a) for a in t.get("state_arrays", [])])
