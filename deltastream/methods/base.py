"""The contract every method follows, written once.

A method is a small class: a ``method_id``, a frozen dataclass of parameters (``Params``), and
pure array functions on one chunk at a time. It imports numpy (and torch), never zarr, dask or
files; the jobs do the I/O. Like a numcodecs codec it is plain data: ``get_config()`` is JSON
with its id, ``from_config`` rebuilds it, and methods are equal when their configs are.

What a method does with a chunk, in the order the jobs call it:

1. ``pre_passes`` full passes over the tensor before anything is written, for figures needed to
   encode (quantile thresholds, residual scales, range-finder products). Pass ``i`` runs
   ``pre_stats(i, delta, ctx)`` on every chunk; the partials of a tensor are combined with
   :func:`combine_partials` (numbers and arrays add up, ``*_list`` values concatenate in chunk
   order) and ``finalize_pre(i, combined, state)`` folds them into the tensor's ``state``.
2. The write pass: ``encode(base_bits, ft_bits, ctx)`` -> the arrays an artifact stores for the
   chunk, and ``post_stats(delta, ctx)`` -> partials of figures only decoding needs (BitDelta's
   mean magnitude: signs do not depend on it, so it costs no extra pass), folded by
   ``finalize_post``. ``decode(base_bits, stored, ctx)`` -> the output chunk's bit patterns.
3. ``edit`` (a checkpoint out) runs the pre passes, a pass for the post figures, then writes
   ``edit_bits`` = ``decode(encode(...))`` for methods with a compact form, so that
   ``apply`` of an artifact and ``edit`` give the same bits by construction.

Roles are types: an :class:`Edit` maps a delta to a delta; an :class:`Encoding` maps it to
stored arrays and back (and so is an edit too); passes are optional on either. The numpy code of
a method is its reference; fused numba kernels and torch kernels for the same roles are
registered by the method's module in ``backends.py`` and chosen per chunk by device and dtype.

A figure over the whole tensor (a mean, a threshold, a product) cannot be made of a NaN or an
infinity: the code computing it raises ``exact.NonFinite`` (noticed on its slow path, never
looked for on the fast one), and the job's chunk task re-raises it with :func:`non_finite_error`,
which finds the first such element. Element-wise edits (DARE, DARE-k, biased, extrapolate) carry
NaN and infinities through as the reference implementations do.

Chunk i of a tensor's plan is chunk i of every stored array. A tensor's ``state`` is a dict:
JSON values go to the manifest, numpy arrays to arrays of the tensor's group, and keys starting
with ``_`` are the encoder's own (thresholds, tie offsets, factors to encode from): they reach
the tasks but are never stored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .. import kernels
from ..dtypes import DType, from_float32, to_float32
from ..errors import CheckpointError, ParameterError, escape, tensor_context
from ..params import describe_params, parse_params
from ..rng import tensor_key
from ..scratch import scratch
from . import backends

if TYPE_CHECKING:
    from ..serve.forms import ServingChunks, ServingForm

__all__ = ["Method", "LossyMethod", "Edit", "Encoding", "StoredArray", "ChunkContext", "combine_partials",
           "NonFiniteDelta", "non_finite_error", "float_delta"]


@dataclass(frozen=True)
class StoredArray:
    """One array an encoding stores per tensor: its role, dtype, length per plan chunk, codecs."""

    role: str
    dtype: np.dtype
    chunk_len: int  # elements of this array that one plan chunk produces (the last may be fewer)
    total_len: int
    compression: str  # a key of artifact.codecs.PRESETS


@dataclass(frozen=True)
class ChunkContext:
    """What a method knows about the chunk in hand: its tensor, place, seed and the tensor's state."""

    tensor: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    stop: int
    index: int = 0
    seed: int = 0
    rng_name: str = ""  # the name whose random stream the tensor uses (a tied tensor: its twin's)
    state: dict = field(default_factory=dict)
    chunk_state: dict = field(default_factory=dict)
    device: str = "cpu"  # where edit_bits computes: "cpu" (numpy), "cuda", or "torch:cpu" (tests)

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def row_len(self) -> int:
        """Elements per row (the last dimension); a 1-D or 0-D tensor is one row."""
        return self.shape[-1] if len(self.shape) >= 2 and self.shape[-1] else max(1, self.size)

    @property
    def rng_key(self) -> tuple[int, int]:
        return tensor_key(self.seed, self.rng_name or self.tensor)


def combine_partials(a: dict | None, b: dict | None) -> dict | None:
    """Fold two chunk partials: values add, ``*_list`` values concatenate (a first), dicts recurse."""
    if a is None:
        return b
    if b is None:
        return a
    out = dict(a)
    for key, value in b.items():
        if key not in out or out[key] is None:
            out[key] = value
        elif value is None:
            continue
        elif key.endswith("_list"):
            out[key] = list(out[key]) + list(value)
        elif isinstance(value, dict):
            out[key] = combine_partials(out[key], value)
        else:
            out[key] = out[key] + value
    return out


class NonFiniteDelta(CheckpointError):
    """A whole-tensor figure met a NaN or infinite delta (a value in a checkpoint). ``args``:
    where and what, then why and what to do (a merge, which has no --exclude, replaces it)."""

    def __str__(self) -> str:
        return "; ".join(self.args)


def non_finite_error(method: Method, ctx: ChunkContext, ft, base, ft_bits: np.ndarray,
                     base_bits: np.ndarray) -> NonFiniteDelta:
    """The error for a chunk whose delta is not finite: the first such element, by its flat index
    in the tensor, and the file (``ft``/``base``: the inputs' TensorInfo, base None if new) whose
    value makes it so. Runs on the error path only."""
    f, b = _values(ft_bits, ctx.dtype), _values(base_bits, ctx.dtype)
    bad = np.flatnonzero(~np.isfinite(float_delta(base_bits, ft_bits, ctx)))
    why = (f"method '{method.method_id}' computes figures over the whole tensor and refuses a non-finite delta; "
           f"keep it exact with --exclude '{escape(ft.name)}'")
    if bad.size == 0:  # not from the inputs (cannot happen with the methods here): say where
        return NonFiniteDelta(f"{tensor_context(ft.path, ft.name)}: a non-finite value in elements "
                              f"{ctx.start}..{ctx.stop}", why)
    i = int(bad[0])
    fv, bv, at = float(f[i]), float(b[i]), ctx.start + i
    if not np.isfinite(fv):
        where, what = ft.path, f"element {at} is {fv:.6g} (base: {bv:.6g})"
    elif not np.isfinite(bv):
        where, what = base.path, f"element {at} of the base is {bv:.6g} (fine-tune: {fv:.6g})"
    else:
        where, what = ft.path, f"element {at}: its delta {fv:.6g} - {bv:.6g} overflows float32"
    return NonFiniteDelta(f"{tensor_context(where, ft.name)}: {what}", why)


def float_delta(base: np.ndarray, ft: np.ndarray, ctx: ChunkContext) -> np.ndarray:
    """f32(ft) - f32(base); for F64, the exact difference rounded once to float32 (the same for
    every lossy method, so the error path of any method recomputes it)."""
    out = scratch("lossy.delta", ft.size, np.float32)
    if ctx.dtype.name == "BF16":
        kernels.bf16_delta(base, ft, out)
        return out
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, carried or refused later
        if ctx.dtype.name == "F64":
            np.subtract(ft.view(np.float64), base.view(np.float64), out=out, casting="same_kind")
            return out
        to_float32(ft, ctx.dtype, out=out)
        out -= to_float32(base, ctx.dtype, out=scratch("lossy.base", base.size, np.float32))
    return out


def _values(bits: np.ndarray, dtype: DType) -> np.ndarray:
    """A chunk's values in their own precision where numpy has it (F64), else as float32."""
    return bits.view(dtype.numpy) if dtype.numpy else to_float32(bits, dtype)


class Method:
    """Base class: subclasses set ``method_id``, ``Params``, ``summary`` and the array functions."""

    method_id: ClassVar[str]
    Params: ClassVar[type]
    summary: ClassVar[str] = ""
    #: parameter sets beyond the defaults that reach each of the method's paths (its options, the
    #: conditions of its fast paths): the shared test kit runs every method with each of them
    examples: ClassVar[tuple[dict[str, Any], ...]] = ()
    compact: ClassVar[bool] = True  # has an artifact form (compress accepts it)
    lossy: ClassVar[bool] = True  # computes in float32, on DType.computable dtypes only (policy.py)

    def __init__(self, params: Any = None, **values: Any):
        self.params = params if params is not None else parse_params(self.method_id, self.Params, values)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.method_id, **dataclasses.asdict(self.params)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Method:
        config = dict(config)
        config.pop("id", None)
        return cls(**config)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"id": cls.method_id, "summary": cls.summary, "compact": cls.compact,
                "params": describe_params(cls.Params)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    def fail(self, message: str) -> ParameterError:
        return ParameterError(f"method '{self.method_id}': {message}")

    @classmethod
    def wants_gradient(cls, params: dict) -> bool:
        """Whether these parameters ask for the gradient of the loss at the fine-tune that they do
        not name yet (``analyze`` then computes it and passes it as ``gradient=``)."""
        return False

    def implements(self, role: str, backend: str) -> bool:
        """Whether this instance's parameters fit the ``role`` implementation registered for
        ``backend`` (methods/backends.py); the numpy reference always applies."""
        return True

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether the method can edit a tensor of this shape (else it is stored exact)."""
        return True

    def stats_group(self, i: int, tensor: str) -> str:
        """Which partials pre pass i folds together: the tensor's own (default), or a shared
        group name for whole-model figures (global trim)."""
        return tensor

    # --- passes ------------------------------------------------------------------------------
    def initial_state(self, shape: tuple[int, ...]) -> dict:
        """A tensor's state before any pass (its figures are added by the finalize hooks)."""
        return {}

    def pre_passes(self, shape: tuple[int, ...]) -> int:
        return 0

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Memory a tensor's state and pass partials take in the driver at their peak. The jobs
        run the passes of tensors in batches whose sum fits a budget, so a method with large
        state (low rank's factors) still runs in bounded memory."""
        return 0

    def pre_stats(self, i: int, delta: np.ndarray, ctx: ChunkContext) -> dict | None:
        return None

    def finalize_pre(self, i: int, combined: dict, state: dict) -> dict:
        return state

    def post_stats(self, delta: np.ndarray, ctx: ChunkContext) -> dict | None:
        return None

    @property
    def has_post_stats(self) -> bool:
        """Whether post_stats is overridden: ``edit`` skips the post pass (a full read) otherwise."""
        return type(self).post_stats is not Method.post_stats

    def finalize_post(self, combined: dict | None, state: dict) -> dict:
        return state

    # --- the artifact form -------------------------------------------------------------------
    def state_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The stored state of a tensor of this shape, name -> (kind, shape): kind "number" or
        "int" (a JSON value), "numbers" (a JSON list of shape[0] numbers) or "array" (a float32
        state array). A reader checks an artifact's state against it before decoding."""
        return {}

    def stored_arrays(self, dtype: DType, shape: tuple[int, ...], chunk_elems: int,
                      state: dict) -> list[StoredArray]:
        raise NotImplementedError

    def encode(self, base: np.ndarray, ft: np.ndarray, ctx: ChunkContext) -> dict[str, np.ndarray]:
        """One chunk: base and fine-tune bit patterns (base zero for a new tensor) -> arrays."""
        raise NotImplementedError

    def decode(self, base: np.ndarray, stored: dict[str, np.ndarray], ctx: ChunkContext) -> np.ndarray:
        """One chunk: base bit patterns and the stored arrays -> the output's bit patterns."""
        raise NotImplementedError

    def encode_with_stats(self, base: np.ndarray, ft: np.ndarray, ctx: ChunkContext) -> tuple[dict, dict | None]:
        """encode, and the chunk's post_stats partial, from one read of the chunk."""
        return self.encode(base, ft, ctx), None

    # --- the checkpoint form -----------------------------------------------------------------
    def edit_bits(self, base: np.ndarray, ft: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        return self.decode(base, self.encode(base, ft, ctx), ctx)

    # --- the serving form (deltastream.serve) --------------------------------------------------
    def serving_form(self, chunks: ServingChunks) -> ServingForm:
        """The tensor's delta as a serving bank keeps it on the device (serve/forms.py), read
        chunk by chunk. Default: the decoded float32 delta, dense; a method with a compact form
        that computes faster than its decode (packed signs, kept entries) gives that instead."""
        from ..serve.forms import DenseDelta

        out = np.empty(math.prod(chunks.shape), np.float32)
        for index, (start, stop) in enumerate(chunks.ranges()):
            out[start:stop] = chunks.delta(index)
        return DenseDelta(out.reshape(chunks.shape))


class LossyMethod(Method):
    """A method on float deltas: delta = f32(ft) - f32(base); output = round(f32(base) + edited).

    Subclasses implement ``encode_delta(delta, base, ft, ctx)`` and
    ``decode_delta(stored, base, ctx) -> edited delta`` (float32), or, for methods without a
    compact form, ``edit_delta(delta, ctx) -> edited delta``.
    """

    def delta(self, base: np.ndarray, ft: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        """f32(ft) - f32(base): float_delta."""
        return float_delta(base, ft, ctx)

    def output_bits(self, base: np.ndarray, edited: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        """round(f32(base) + edited) in the tensor's dtype (edited is overwritten); F64 adds in
        float64, so an element the edit leaves at 0 keeps the base's exact value."""
        out = scratch("lossy.out", base.size, ctx.dtype.bits)
        if ctx.dtype.name == "BF16":  # one fused pass
            kernels.bf16_add_round(base, edited, out)
            return out
        with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf, or beyond F16's range
            if ctx.dtype.name == "F64":
                return np.add(base.view(np.float64), edited, out=out.view(np.float64)).view(ctx.dtype.bits)
            edited += to_float32(base, ctx.dtype, out=scratch("lossy.base", base.size, np.float32))
            return from_float32(edited, ctx.dtype, out=out)

    def _fast(self, role: str, ctx: ChunkContext):
        """The registered numba/torch implementation of ``role`` for this chunk, or None (numpy)."""
        return backends.find(self, role, ctx.device, ctx.dtype.name)

    def encode(self, base, ft, ctx):
        fast = self._fast("encode", ctx)
        if fast is not None:
            return fast(self, base, ft, ctx)[0]
        return self.encode_delta(self.delta(base, ft, ctx), base, ft, ctx)

    def encode_with_stats(self, base, ft, ctx):
        fast = self._fast("encode", ctx)
        if fast is not None:
            return fast(self, base, ft, ctx)
        delta = self.delta(base, ft, ctx)
        post = self.post_stats(delta, ctx)  # before encode_delta, which may reuse delta's memory
        return self.encode_delta(delta, base, ft, ctx), post

    def decode(self, base, stored, ctx):
        fast = self._fast("decode", ctx)
        if fast is not None:
            return fast(self, base, stored, ctx)
        return self.output_bits(base, self.decode_delta(stored, base, ctx), ctx)

    def edit_bits(self, base, ft, ctx):
        fast = self._fast("edit", ctx)
        if fast is not None:
            return fast(self, base, ft, ctx)
        # a compact method may give a direct edit_delta when it is cheaper than decode(encode());
        # the tests check that it equals apply of the artifact, bit for bit
        if self.compact and type(self).edit_delta is LossyMethod.edit_delta:
            return super().edit_bits(base, ft, ctx)
        return self.output_bits(base, self.edit_delta(self.delta(base, ft, ctx), ctx), ctx)

    def encode_delta(self, delta, base, ft, ctx) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode_delta(self, stored, base, ctx) -> np.ndarray:
        raise NotImplementedError

    def edit_delta(self, delta: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        raise NotImplementedError


class Edit(LossyMethod):
    """The edit role: ``edit_delta(delta, ctx)`` -> the edited delta; a checkpoint out, no
    artifact form (extrapolate, biased, trim)."""

    compact = False


class Encoding(LossyMethod):
    """The encoding role: ``encode_delta`` -> the arrays ``stored_arrays`` lists, ``decode_delta``
    -> the edited delta. An encoding is also an edit, ``decode(encode())``, unless it gives an
    ``edit_delta`` with the same bits that costs less."""

    compact = True
