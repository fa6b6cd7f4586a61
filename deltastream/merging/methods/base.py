"""The contract of a streamed merge method (slerp, nuslerp, model_stock, ...), written once.

A method owns all of itself, in its own module: its name and mergekit's parameters
(:class:`Param`: names, defaults, which are per model), how the base model takes part, how many
models it takes, its statistics passes over a tensor (norms, dot products, variances, ranks: sums
that are the same for any chunking, ``methods.sums`` and ``deltastream.ranks``), its per-chunk
combine and a dense numpy reference written from mergekit's code, which the tests compare with.
The driver (``merging.streamed``) knows none of them by name: it reads ``STREAMED`` (name ->
method), the registry each module adds itself to with :func:`register`.

What the driver calls, per tensor (a :class:`TensorJob`):

1. ``passes(job)`` statistics passes; pass ``i`` calls ``pass_stats(i, job, chunk)`` on every
   chunk (any order, any worker) and ``finalize(i, job, combined)`` with the partials folded by
   ``methods.base.combine_partials`` (numbers and arrays add, ``*_list`` concatenate in chunk
   order); it returns the job's new ``state``. A state with ``"done": True`` skips the rest.
2. The write pass: ``combine(job, chunk)`` -> the merged float32 chunk, rounded once to the
   output dtype by the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ...sources import Source
from . import sums

__all__ = ["Param", "REQUIRED", "Chunk", "TensorJob", "StreamedMethod", "STREAMED", "register"]

REQUIRED = object()  # the default of a parameter the config must give


@dataclass(frozen=True)
class Param:
    """A parameter with mergekit's key: ``number`` (a number, a gradient over the layers or a
    list of {filter, value}, resolved per tensor), ``flag`` (true/false) or ``int``; a
    ``per_model`` one may be given per model (or globally, as every model's default)."""

    default: Any
    help: str
    kind: str = "number"
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class Chunk:
    """Elements [start, stop) of one tensor: the base's and each model's values as float32."""

    start: int
    stop: int
    index: int  # the chunk's place in the tensor's chunking (the same in every pass)
    base: np.ndarray | None
    models: list[np.ndarray]

    def deltas(self) -> list[np.ndarray]:
        """Each model's delta from the base (new arrays)."""
        assert self.base is not None
        return [m - self.base for m in self.models]


@dataclass
class TensorJob:
    """One float tensor of a streamed merge: its inputs, its resolved parameters, its chunking and
    the state its passes found. Shared with every task of the tensor (a node of the graph)."""

    name: str
    shape: tuple[int, ...]
    base: Source | None
    models: tuple[Source, ...]
    values: dict[str, Any]  # the global parameters, resolved for this tensor (defaults filled)
    model_values: tuple[dict[str, Any], ...]  # each model's per-model parameters, resolved
    chunk_elems: int
    state: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def weights(self, key: str = "weight") -> list[float]:
        return [float(v[key]) for v in self.model_values]


class StreamedMethod:
    """A streamed merge method; subclasses set the class attributes and the hooks they need."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    #: "required" (the base is the reference, never a model), "optional" (likewise, if given),
    #: "member" (the base is one more model, as mergekit's karcher takes it)
    base_model: ClassVar[str] = "required"
    whole_rows: ClassVar[bool] = False  # chunks hold whole rows (a per-row softmax)

    def check_models(self, n: int, has_base: bool) -> str | None:
        """A problem with the number of models (besides the base), or None."""
        return None

    def check_tensor(self, job: TensorJob) -> str | None:
        """A problem with a tensor's resolved parameters (found at plan time), or None."""
        return None

    def passes(self, job: TensorJob) -> int:
        return 0

    def pass_stats(self, i: int, job: TensorJob, chunk: Chunk) -> dict | None:
        raise NotImplementedError

    def finalize(self, i: int, job: TensorJob, combined: dict) -> dict:
        raise NotImplementedError

    def combine(self, job: TensorJob, chunk: Chunk) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def reference(base: np.ndarray | None, models: list[np.ndarray], **params: Any) -> np.ndarray:
        """mergekit's formula on whole tensors (numpy), for the tests."""
        raise NotImplementedError

    # --- helpers the methods share ------------------------------------------------------------
    @staticmethod
    def gram(vectors: list[np.ndarray], start: int, along: sums.Vectors, pairs: bool = True) -> dict:
        """Partials of every sum(v_i * v_j), i <= j (or only the squares), keyed "i,j"."""
        out = {}
        for i, a in enumerate(vectors):
            for j in range(i, len(vectors) if pairs else i + 1):
                out[f"{i},{j}"] = sums.product_sum(a, vectors[j], start, along)
        return out

    @staticmethod
    def gram_matrix(combined: dict, n: int):
        """The symmetric matrix (float64; per vector: shape (n, n, vectors)) of a gram partial."""
        values = {k: sums.value(v) for k, v in combined.items()}
        first = values["0,0"]
        out = np.zeros((n, n) + np.shape(first), np.float64)
        for key, v in values.items():
            i, j = map(int, key.split(","))
            out[i, j] = out[j, i] = v
        return out


STREAMED: dict[str, StreamedMethod] = {}


def register(cls: type[StreamedMethod]) -> type[StreamedMethod]:
    """Class decorator: add the method to ``STREAMED`` under its mergekit name."""
    if cls.name in STREAMED:
        raise ValueError(f"merge method {cls.name!r} registered twice")
    STREAMED[cls.name] = cls()
    return cls
