"""DARE (Yu et al. 2024), with the paper's DARE-k extension, and the Table 1 "biased" variant.

``M ~ Bernoulli(p)`` per element (1 = drop), drawn from the element RNG, so the mask of an
element depends only on (seed, tensor name, element index)::

    k = 0 (DARE):    edited = (1 - M) * delta * factor
                     factor = 1/(1-p) (rescale: inverse), ||delta||_1 / ||(1-M) delta||_1 per
                     tensor (l1, mergekit's), or 1 (none, "DropOnly")
    k != 0 (DARE-k): edited = k * M * delta + (1 - k p)/(1 - p) * (1 - M) * delta    (unbiased)

As an artifact, DARE stores only the kept entries of each chunk, compacted to the chunk's front
as the zigzagged integer difference of bit patterns (exact, like ``lossless``): the mask is
regenerated at apply time from the seed, so no index is stored. DARE-k needs every entry, so it
stores the whole exact delta and applies the multipliers at decode.

``biased`` (paper §4.3, Table 1) is DARE-k with a deterministic sign in place of the mask:
entries where the sign source is negative x k, the others x (1 - k p)/(1 - p), zeros stay zero.
The source is the delta (``by=delta``, Table 1's second column) or the product ``delta * grad``
with the gradient of the loss at the fine-tune (``by=grad``, the third), read chunk by chunk from a
gradient checkpoint that ``deltastream analyze --save-gradient`` writes. Edit only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..checkpoint import open_checkpoint
from ..checkpoint.reader import read_bits
from ..device import TORCH_DTYPES, as_values, edit_on_device, load_bits, store_output, torch_device
from ..dtypes import COMPUTABLE_NAMES, to_float32
from ..errors import CorruptChunkError, MismatchError, ParameterError, tensor_context
from ..exact import magnitude_sum, total
from ..params import check_range, field
from ..rng import threshold_u32
from ..scratch import scratch
from . import dare_kernels
from .backends import register
from .base import ChunkContext, Edit, Encoding, LossyMethod, StoredArray
from .lossless import unzigzag, zigzag

__all__ = ["Dare", "Biased", "keep_mask", "keep_threshold", "dare_k_multiplier", "exact_delta", "l1_factor"]

RESCALES = ("inverse", "l1", "none")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either L1 norm is below this


def l1_factor(combined: dict | None) -> float:
    """||delta||_1 / ||kept delta||_1 from exact partial sums (``abs``, ``abs_kept``); 1 when
    either norm is under L1_EPS (mergekit's rule), so a near-empty mask never blows up."""
    before = total(combined["abs"]) if combined else 0.0
    kept = total(combined["abs_kept"]) if combined else 0.0
    return before / kept if kept >= L1_EPS and before >= L1_EPS else 1.0


def keep_threshold(p: float) -> int:
    """Elements whose 32-bit draw is at or above this are kept (p < 1)."""
    return min(threshold_u32(p), 2**32 - 1)


def dare_k_multiplier(p: float, k: float) -> np.float32:
    """DARE-k's multiplier of a kept entry, (1 - k p)/(1 - p), so that E[edited] = delta
    (and ``biased``'s multiplier of a positive one)."""
    return np.float32((1 - k * p) / (1 - p))


def keep_mask(ctx: ChunkContext, p: float) -> np.ndarray:
    """True where the element is kept: its 32-bit draw is at or above p * 2^32."""
    keep = scratch("dare.keep", ctx.size, bool)
    dare_kernels.keep_draws(*ctx.rng_key, ctx.start, ctx.size, keep_threshold(p), keep)
    return keep


def exact_delta(base: np.ndarray, ft: np.ndarray, out_tag: str = "dare.bits") -> np.ndarray:
    """The fine-tune as a zigzagged integer difference of bit patterns (exact, compressible)."""
    return zigzag(np.subtract(ft, base, out=scratch(out_tag, ft.size, ft.dtype)))


def delta_from_bits(base: np.ndarray, zz: np.ndarray, ctx: ChunkContext, method: LossyMethod) -> np.ndarray:
    """float32 delta of the fine-tune whose zigzagged bit difference from base is ``zz``."""
    ft = np.add(base, unzigzag(zz), out=zz)
    return method.delta(base, ft, ctx)


@dataclass(frozen=True)
class DareParams:
    p: float = field(0.9, "drop rate: the probability that a delta entry is dropped")
    rescale: str = field("inverse", "kept entries x 1/(1-p) (inverse), x ||d||_1/||kept d||_1 per tensor (l1), "
                         "or x 1 (none)", choices=RESCALES)
    k: float = field(0.0, "DARE-k: dropped entries x k, kept x (1-kp)/(1-p); 0 is plain DARE")

    def __post_init__(self):
        check_range("dare", "p", self.p, 0.0, 1.0, high_open=True)
        if not math.isfinite(self.k):
            raise ParameterError(f"method 'dare': k={self.k!r} must be a finite number")
        if self.k != 0 and self.rescale != "inverse":
            raise ParameterError("method 'dare': k != 0 (DARE-k) is defined with rescale=inverse only")


class Dare(Encoding):
    method_id = "dare"
    Params = DareParams
    summary = "random drop of a fraction p of the delta, rescaled (DARE); k: the paper's DARE-k"
    examples = ({"p": 0.9}, {"p": 0.5, "k": -0.5}, {"p": 0.6, "rescale": "l1"}, {"p": 0.3, "rescale": "none"})

    def state_layout(self, shape):
        return {"factor": ("number", ())} if self.params.rescale == "l1" else {}

    def stored_arrays(self, dtype, shape, chunk_elems, state) -> list[StoredArray]:
        role = "kept" if self.params.k == 0 else "delta"
        return [StoredArray(role, dtype.bits, chunk_elems, math.prod(shape), "delta")]

    def post_stats(self, delta, ctx):
        if self.params.rescale != "l1":
            return None
        return {"abs": magnitude_sum(delta), "abs_kept": magnitude_sum(delta, keep_mask(ctx, self.params.p))}

    def finalize_post(self, combined, state):
        if self.params.rescale == "l1":
            state = {**state, "factor": l1_factor(combined)}
        return state

    def factor(self, ctx: ChunkContext) -> np.float32:
        p = self.params
        if p.rescale == "inverse":
            return np.float32(1.0 / (1.0 - p.p))
        return np.float32(ctx.state.get("factor", 1.0)) if p.rescale == "l1" else np.float32(1.0)

    def implements(self, role, backend):
        # numba: the fused BF16 output and the encode that needs no float delta are DARE's (k = 0)
        if backend == "numba":
            return self.params.k == 0 and (role != "encode" or self.params.rescale != "l1")
        return True

    def encode_delta(self, delta, base, ft, ctx):
        if self.params.k != 0:
            return {"delta": exact_delta(base, ft)}
        kept = scratch("dare.bits", ft.size, ft.dtype)  # one fused pass: draw, compare, diff, compact
        count = dare_kernels.dare_compact(base, ft, *ctx.rng_key, ctx.start, keep_threshold(self.params.p),
                                     ft.dtype.itemsize * 8, kept)
        return {"kept": kept[:count]}

    def _short(self, ctx, stored) -> CorruptChunkError:
        return CorruptChunkError(f"tensor '{ctx.tensor}' chunk {ctx.index}: the seed keeps more entries than "
                                 f"the {stored} stored (a corrupt artifact)")

    def edit_delta(self, delta, ctx):
        """The same bits as decode(encode()), with one draw of the mask instead of two."""
        if self.params.k == 0:  # one fused pass: draw, compare, scale or zero
            dare_kernels.dare_scale_kept(delta, *ctx.rng_key, ctx.start, keep_threshold(self.params.p),
                                         self.factor(ctx))
            return delta
        return self._apply_mask(delta, keep_mask(ctx, self.params.p), ctx)

    def _apply_mask(self, delta, keep, ctx):
        if self.params.k == 0:
            delta *= self.factor(ctx)
            delta[~keep] = 0
        else:
            p, k = self.params.p, self.params.k
            with np.errstate(invalid="ignore"):  # a zero multiplier times an infinite delta: NaN, carried
                delta *= kernels.select(keep, dare_k_multiplier(p, k), np.float32(k),
                                        scratch("dare.multiplier", delta.size, np.float32))
        return delta

    def decode_delta(self, stored, base, ctx):
        keep = keep_mask(ctx, self.params.p)
        zz = scratch("dare.bits", ctx.size, base.dtype)
        if self.params.k != 0:
            zz[...] = stored["delta"][: ctx.size]
        else:
            kept = stored["kept"]
            if dare_kernels.dare_expand(kept, keep, zz) > kept.size:
                raise self._short(ctx, kept.size)
        return self._apply_mask(delta_from_bits(base, zz, ctx, self), keep, ctx)

    def serving_form(self, chunks):
        """DARE: the kept entries' decoded deltas and their flat indices, the mask regenerated from
        the seed chunk by chunk (a sparse index built once: no draws per product); DARE-k changes
        every entry, so it is dense."""
        if self.params.k != 0:
            return super().serving_form(chunks)
        from ..serve.forms import SparseDelta

        index, values = [], []
        for i, (start, _) in enumerate(chunks.ranges()):
            keep = keep_mask(chunks.context(i), self.params.p).copy()
            index.append(np.flatnonzero(keep) + start)
            values.append(chunks.delta(i)[keep])
        return SparseDelta(chunks.shape, np.concatenate(index).astype(np.int64), np.concatenate(values))


BIASED_BY = ("delta", "grad")


@dataclass(frozen=True)
class BiasedParams:
    p: float = field(0.5, "the drop rate the multipliers are built from")
    k: float = field(0.5, "entries whose sign source is negative x k, the others x (1-kp)/(1-p)")
    by: str = field("delta", "the sign source: the delta (Table 1's 'biased dW') or delta x grad L(W_POST) "
                    "('biased dW.grad', needs gradient=)", choices=BIASED_BY)
    gradient: str = field("", "by=grad: safetensors checkpoint of grad L(W_POST) under the fine-tune's tensor "
                          "names (deltastream analyze --save-gradient writes one; analyze computes its own)")

    def __post_init__(self):
        check_range("biased", "p", self.p, 0.0, 1.0, high_open=True)
        if not math.isfinite(self.k):
            raise ParameterError(f"method 'biased': k={self.k!r} must be a finite number")
        if self.by == "grad" and not self.gradient:
            raise ParameterError("method 'biased': by=grad needs gradient=FILE, the gradient at the fine-tune "
                                 "('deltastream analyze --save-gradient FILE' writes one)")
        if self.by == "delta" and self.gradient:
            raise ParameterError("method 'biased': gradient= is for by=grad only")


def gradient_chunk(path: str, ctx: ChunkContext) -> np.ndarray:
    """Elements [start, stop) of the tensor's gradient in the gradient checkpoint, as float32."""
    ckpt = _open_gradient(path)
    info = ckpt.tensors.get(ctx.tensor)
    if info is None:
        raise MismatchError(f"{tensor_context(path, ctx.tensor)}: the gradient checkpoint has no such tensor")
    if info.numel != math.prod(ctx.shape) or not info.dtype.computable:
        raise MismatchError(f"{tensor_context(info.path, ctx.tensor)}: gradient of shape {list(info.shape)} "
                            f"({info.dtype.name}) does not fit the tensor's {list(ctx.shape)}")
    return to_float32(read_bits(info, ctx.start, ctx.stop), info.dtype)


@functools.lru_cache(maxsize=4)
def _open_gradient(path: str):
    return open_checkpoint(path)  # headers only: each task reads its chunk


class Biased(Edit):
    method_id = "biased"
    Params = BiasedParams
    summary = "the paper's Table 1 'biased' DARE-k: the sign of the delta (or of delta x grad) instead of a mask"
    examples = ({"p": 0.3, "k": 0.2}, {"p": 0.5, "k": 0.7})

    @classmethod
    def wants_gradient(cls, params):
        return params.get("by") == "grad" and not params.get("gradient")

    def implements(self, role, backend):
        return self.params.by == "delta"  # by=grad reads the gradient on the CPU: the numpy path

    def negative(self, delta: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        """Where the sign source is negative: the delta's, or its product with the gradient's."""
        if self.params.by == "grad":
            return (delta * gradient_chunk(self.params.gradient, ctx)) < 0
        return delta < 0

    def edit_delta(self, delta, ctx):
        p, k = self.params.p, self.params.k
        negative = self.negative(delta, ctx)
        with np.errstate(invalid="ignore"):  # a zero multiplier times an infinite delta: NaN, carried
            delta *= kernels.select(negative, np.float32(k), dare_k_multiplier(p, k),
                                    scratch("biased.multiplier", delta.size, np.float32))
        return delta


# --- fast paths: numba (fused BF16 output; encode without a float delta) and torch --------------
def _bf16_output(method: Dare, base, source, compact: bool, ctx: ChunkContext) -> np.ndarray:
    """The whole output of a BF16 chunk in one kernel (k = 0): from ft (edit) or the kept entries."""
    out = scratch("lossy.out", ctx.size, np.uint16)
    kept = dare_kernels.dare_bf16_output(base, source, compact, *ctx.rng_key, ctx.start,
                                         keep_threshold(method.params.p), method.factor(ctx), out)
    if compact and kept > source.size:
        raise method._short(ctx, source.size)
    return out


def _keep_torch(method: Dare, ctx, dev):
    from ..rng import uniform_u32_torch

    return uniform_u32_torch(ctx.rng_key, ctx.start, ctx.stop, device=dev) >= keep_threshold(method.params.p)


def _edit_torch_delta(method: Dare, delta, keep, ctx, dev):
    """DARE's edit of a float32 delta on the device, given the keep mask (the numpy _apply_mask)."""
    import torch

    from .torch_ops import scalar

    p = method.params
    if p.k == 0:
        delta = delta * float(method.factor(ctx))
        return torch.where(keep, delta, torch.zeros((), dtype=torch.float32, device=dev))
    return delta * torch.where(keep, scalar(dare_k_multiplier(p.p, p.k), dev), scalar(p.k, dev))


def _edit_torch(method: Dare, base, ft, ctx):
    return edit_on_device(base, ft, ctx, ctx.device,
                          lambda delta, ctx, dev: _edit_torch_delta(method, delta, _keep_torch(method, ctx, dev),
                                                                    ctx, dev))


def _decode_torch(method: Dare, base, stored, ctx):
    import torch

    dev, width = torch_device(ctx.device), 8 * ctx.dtype.itemsize
    base_bits, b = load_bits(base, ctx, dev)
    keep = _keep_torch(method, ctx, dev)
    if method.params.k == 0:
        zz = torch.zeros(ctx.size, dtype=torch.int64, device=dev)
        zz[keep] = torch.from_numpy(stored["kept"][: int(keep.sum())].astype(np.int64)).to(dev)
    else:
        zz = torch.from_numpy(stored["delta"][: ctx.size].astype(np.int64)).to(dev)
    difference = (zz >> 1) ^ -(zz & 1)  # un-zigzag (values below 2^width: no sign to drag)
    ft = as_values((base_bits + difference) & ((1 << width) - 1), ctx)
    return store_output(b + _edit_torch_delta(method, ft - b, keep, ctx, dev), ctx)


def _encode_torch(method: Dare, base, ft, ctx):
    from .torch_ops import fixed_sum

    dev, width = torch_device(ctx.device), 8 * ctx.dtype.itemsize
    base_bits, b = load_bits(base, ctx, dev)
    ft_bits, f = load_bits(ft, ctx, dev)
    keep = _keep_torch(method, ctx, dev)
    difference = (ft_bits - base_bits) & ((1 << width) - 1)  # mod 2^width, as unsigned
    signed_diff = difference - ((difference >> (width - 1)) << width)  # two's complement value
    zz = ((signed_diff << 1) ^ (signed_diff >> (width - 1))) & ((1 << width) - 1)  # zigzag
    stored = {"kept": zz[keep]} if method.params.k == 0 else {"delta": zz}
    stored = {k: v.cpu().numpy().astype(ctx.dtype.bits) for k, v in stored.items()}
    post = None
    if method.params.rescale == "l1":
        delta = f - b
        post = {"abs": fixed_sum(delta), "abs_kept": fixed_sum(delta[keep])}
    return stored, post


register(Dare, "edit", "numba", ("BF16",))(lambda m, base, ft, ctx: _bf16_output(m, base, ft, False, ctx))
register(Dare, "decode", "numba", ("BF16",))(lambda m, base, stored, ctx: _bf16_output(m, base, stored.get("kept"),
                                                                                       True, ctx))
register(Dare, "encode", "numba", COMPUTABLE_NAMES)(
    lambda m, base, ft, ctx: (m.encode_delta(None, base, ft, ctx), None))


def _biased_torch(method: Biased, base, ft, ctx):
    import torch

    from .torch_ops import scalar

    p = method.params
    return edit_on_device(base, ft, ctx, ctx.device, lambda delta, ctx, dev: delta * torch.where(
        delta < 0, scalar(p.k, dev), scalar(dare_k_multiplier(p.p, p.k), dev)))


register(Dare, "edit", "torch", TORCH_DTYPES)(_edit_torch)
register(Dare, "decode", "torch", TORCH_DTYPES)(_decode_torch)
register(Dare, "encode", "torch", TORCH_DTYPES)(_encode_torch)
register(Biased, "edit", "torch", TORCH_DTYPES)(_biased_torch)
