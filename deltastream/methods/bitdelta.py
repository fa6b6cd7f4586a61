"""BitDelta (Liu et al. 2024): the delta as its signs times one scale, and its extensions.

::

    edited = alpha * sign(delta),   alpha = scale * mean|delta|     (per tensor, or per row)

``sign(0) = +1`` as the reference code does (``zero: plus``); ``zero: keep`` stores a second
plane marking the non-zero entries (ternary: exact zeros, which bf16 deltas have many of, stay
zero, and alpha is then the mean over the non-zero entries). ``scale`` is the paper's "multiple
of the average magnitude" (1 = BitDelta). ``residual: n`` is BitDelta's own finer fidelity:
binarise the residual ``delta - edited`` again, n more times, each level with its own scale.
The paper's multi-bit extension (2^b equal-count magnitude blocks per tensor) is its own method,
``multibit`` (multibit.py).

Signs do not depend on alpha, so a compress is ONE streaming pass: each chunk writes its packed
signs and returns exact partial magnitude sums, and alpha is finalized when the pass ends.
Each residual level needs the previous levels' scales, so it costs one more pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..device import TORCH_DTYPES, edit_on_device, load_bits, store_output, torch_device
from ..errors import escape
from ..exact import magnitude_sum, row_magnitude_sums, total
from ..params import check_range, field
from ..scratch import scratch
from . import bitdelta_kernels
from .backends import register
from .base import ChunkContext, Encoding
from .packing import pack, packed_array, unpack

__all__ = ["BitDelta", "row_index_ranges"]

_BLOCK = 1 << 20  # elements of the fused encode's float32 delta block (4 MiB: stays in cache)


@dataclass(frozen=True)
class BitDeltaParams:
    scale: float = field(1.0, "multiple of the mean magnitude used as the scale (the paper's 'degenerate' axis)")
    per: str = field("tensor", "one scale per tensor (BitDelta) or per row", choices=("tensor", "row"))
    residual: int = field(0, "extra 1-bit levels fitted to the residual (BitDelta's finer fidelity)")
    zero: str = field("plus", "sign of an exact zero: +1 (plus, the reference code) or kept at 0 (keep)",
                      choices=("plus", "keep"))

    def __post_init__(self):
        check_range("bitdelta", "scale", self.scale, 0.0, None, low_open=True)
        check_range("bitdelta", "residual", self.residual, 0, 8)


def row_index_ranges(ctx: ChunkContext) -> tuple[int, int, int, int]:
    """(first row, first full row, end of full rows, last row + 1) of the chunk's elements."""
    r = ctx.row_len
    first, last = ctx.start // r, (ctx.stop - 1) // r + 1 if ctx.size else ctx.start // r
    full_lo = -(-ctx.start // r)
    full_hi = ctx.stop // r
    return first, full_lo, max(full_lo, full_hi), last


class BitDelta(Encoding):
    method_id = "bitdelta"
    Params = BitDeltaParams
    summary = "packed signs of the delta times one scale per tensor or row (BitDelta); residual levels"
    examples = ({"per": "row", "zero": "keep"}, {"residual": 1})

    def __init__(self, params=None, **values):
        if "bits" in values:  # multi-bit BitDelta was bitdelta's bits parameter before
            bits = escape(str(values["bits"]))
            raise self.fail("has no parameter bits: multi-bit BitDelta is its own method, multibit -p bits="
                            + (bits if len(bits) <= 20 else bits[:20] + "..."))
        super().__init__(params, **values)

    def implements(self, role, backend):
        p = self.params
        if backend == "numba":  # BitDelta itself: 1 bit, one scale per tensor, one kernel a chunk
            return p.per == "tensor" and self.levels == 1 and p.zero == "plus"
        return self.levels == 1 and (role != "encode" or p.per == "tensor")  # per-row scales: CPU

    @property
    def levels(self) -> int:
        return self.params.residual + 1

    # --- magnitude sums: per tensor, or per row ---------------------------------------------------
    def _sums(self, r: np.ndarray, ctx: ChunkContext, nonzero: np.ndarray | None) -> dict:
        if self.params.per == "tensor":
            return {"abs": magnitude_sum(r, nonzero),
                    "count": int(nonzero.sum()) if nonzero is not None else r.size}
        rows = []
        first, lo, hi, last = row_index_ranges(ctx)
        row_len = ctx.row_len
        for row in range(first, last):  # rows cut by the chunk's ends: at most two
            if lo <= row < hi:
                continue
            a, b = max(ctx.start, row * row_len) - ctx.start, min(ctx.stop, (row + 1) * row_len) - ctx.start
            nz = nonzero[a:b] if nonzero is not None else None
            rows.append((row, magnitude_sum(r[a:b], nz), int(nz.sum()) if nz is not None else b - a))
        if hi > lo:
            a, b = lo * row_len - ctx.start, hi * row_len - ctx.start
            sums = row_magnitude_sums(r[a:b] if nonzero is None else np.where(nonzero[a:b], r[a:b], 0), row_len)
            counts = (nonzero[a:b].reshape(-1, row_len).sum(axis=1).tolist() if nonzero is not None
                      else [row_len] * (hi - lo))
            rows += list(zip(range(lo, hi), sums, counts))
        return {"rows_list": rows}

    def _alpha(self, combined: dict | None, ctx_rows: int) -> float | np.ndarray:
        s = self.params.scale
        if self.params.per == "tensor":
            if not combined or not combined["count"]:
                return 0.0
            return s * total(combined["abs"]) / combined["count"]
        sums, counts = [0] * ctx_rows, [0] * ctx_rows
        for row, fixed, count in (combined or {}).get("rows_list", []):
            sums[row] += fixed
            counts[row] += count
        return np.array([s * total(f) / c if c else 0.0 for f, c in zip(sums, counts)], np.float32)

    def _alpha_of(self, level: int, ctx: ChunkContext) -> np.ndarray | np.float32:
        alpha = ctx.state["alpha"][level]
        if self.params.per == "tensor":
            return np.float32(alpha)
        rows = np.asarray(alpha, np.float32)
        first = ctx.start // ctx.row_len
        if ctx.start % ctx.row_len == 0 and ctx.size % ctx.row_len == 0:
            return np.repeat(rows[first: first + ctx.size // ctx.row_len], ctx.row_len)
        return rows[np.arange(ctx.start, ctx.stop) // ctx.row_len]

    def _residual(self, delta: np.ndarray, upto: int, ctx: ChunkContext) -> np.ndarray:
        """delta minus the first ``upto`` levels' approximation (the level ``upto`` residual);
        level 0 is delta itself (callers may overwrite it, as encode_delta may)."""
        if upto == 0:
            return delta
        r = scratch("bitdelta.residual", delta.size, np.float32)
        r[...] = delta
        for j in range(upto):
            sign = kernels.select(r >= 0, np.float32(1), np.float32(-1), scratch("bitdelta.sign", r.size, np.float32))
            r -= self._alpha_of(j, ctx) * sign
        return r

    def _nonzero(self, delta: np.ndarray) -> np.ndarray | None:
        return delta != 0 if self.params.zero == "keep" else None

    def _rows(self, shape) -> int:
        return math.prod(shape[:-1]) if len(shape) >= 2 else 1

    # --- passes -------------------------------------------------------------------------------------
    def pre_passes(self, shape):
        return self.params.residual

    def pre_stats(self, i, delta, ctx):
        return self._sums(self._residual(delta, i, ctx), ctx, self._nonzero(delta))

    def finalize_pre(self, i, combined, state):
        return {**state, "alpha": list(state.get("alpha", [])) + [self._alpha(combined, state["_rows"])]}

    def post_stats(self, delta, ctx):
        return self._sums(self._residual(delta, self.levels - 1, ctx), ctx, self._nonzero(delta))

    def finalize_post(self, combined, state):
        alphas = list(state.get("alpha", [])) + [self._alpha(combined, state["_rows"])]
        if self.params.per == "row":
            return {"alpha": np.stack(alphas).astype(np.float32)}
        return {"alpha": [float(a) for a in alphas]}

    def initial_state(self, shape) -> dict:
        return {"_rows": self._rows(shape)}

    # --- the artifact form ----------------------------------------------------------------------
    def state_layout(self, shape):
        if self.params.per == "row":
            return {"alpha": ("array", (self.levels, self._rows(shape)))}
        return {"alpha": ("numbers", (self.levels,))}

    def stored_arrays(self, dtype, shape, chunk_elems, state):
        numel = math.prod(shape)
        arrays = [packed_array(f"signs{j}", chunk_elems, numel) for j in range(self.levels)]
        if self.params.zero == "keep":
            arrays.append(packed_array("nonzero", chunk_elems, numel))
        return arrays

    def encode_delta(self, delta, base, ft, ctx):
        out = {}
        if self.params.zero == "keep":
            out["nonzero"] = pack(delta != 0)
        r = delta  # the level-0 residual; later levels overwrite it in place
        for j in range(self.levels):
            positive = r >= 0
            out[f"signs{j}"] = pack(positive)
            if j + 1 < self.levels:
                r -= self._alpha_of(j, ctx) * kernels.select(positive, np.float32(1), np.float32(-1),
                                                             scratch("bitdelta.sign", r.size, np.float32))
        return out

    def decode_delta(self, stored, base, ctx):
        edited = scratch("bitdelta.edited", ctx.size, np.float32)
        edited[...] = 0
        for j in range(self.levels):
            alpha = np.atleast_1d(np.asarray(self._alpha_of(j, ctx), np.float32))
            bitdelta_kernels.add_signed(stored[f"signs{j}"], alpha, alpha.size > 1, edited)
        if self.params.zero == "keep":
            edited[~unpack(stored["nonzero"], ctx.size)] = 0
        return edited

    def serving_form(self, chunks):
        """The packed sign planes as rows and +-alpha per row and level (never decoded)."""
        from ..serve.forms import SignDelta, packed_rows, rows_cols

        rows = rows_cols(chunks.shape)[0]
        if self.params.per == "row":
            alphas = np.asarray(chunks.context(0).state["alpha"], np.float32).reshape(self.levels, rows)
        else:
            alphas = np.repeat(np.asarray(chunks.context(0).state["alpha"], np.float32)[:, None], rows, axis=1)
        mask = packed_rows(chunks, "nonzero") if self.params.zero == "keep" else None
        return SignDelta(chunks.shape, tuple(packed_rows(chunks, f"signs{j}") for j in range(self.levels)),
                         alphas, mask)


# --- fast paths: numba (1-bit per tensor, BF16) and torch (no residual levels) ------------------
def _encode_fused(method: BitDelta, base, ft, ctx) -> tuple[dict, dict]:
    """Packed signs and the exact magnitude sum, a 4 MiB block of the float32 delta at a time:
    the delta never exists whole (a chunk of 16M bf16 elements would need 64 MiB for it), and
    the sum re-reads each block from cache."""
    signs = scratch("bitdelta.signs", math.ceil(ctx.size / 8), np.uint8)
    delta = scratch("bitdelta.block", min(ctx.size, _BLOCK), np.float32)
    fixed = 0
    for s in range(0, ctx.size, _BLOCK):  # _BLOCK is a multiple of 8: blocks start on a byte
        e = min(ctx.size, s + _BLOCK)
        bitdelta_kernels.bf16_delta_signs(base[s:e], ft[s:e], delta[: e - s], signs[s // 8: (e + 7) // 8])
        fixed += magnitude_sum(delta[: e - s])
    return {"signs0": signs}, {"abs": fixed, "count": ctx.size}


def _decode_fused(method: BitDelta, base, stored, ctx) -> np.ndarray:
    out = scratch("lossy.out", ctx.size, np.uint16)
    bitdelta_kernels.bitdelta_bf16_output(base, stored["signs0"], method._alpha_of(0, ctx), out)
    return out


def _signed_alpha_torch(method: BitDelta, positive, ctx, dev):
    """+-alpha by sign: alpha per tensor, or per row of the chunk's elements."""
    import torch

    from .torch_ops import scalar

    alpha = ctx.state["alpha"][0]
    if method.params.per == "tensor":
        scale = scalar(alpha, dev)
    else:
        scale = torch.from_numpy(np.asarray(alpha, np.float32)[np.arange(ctx.start, ctx.stop) // ctx.row_len]).to(dev)
    return torch.where(positive, scale, -scale)


def _edit_torch_delta(method: BitDelta, delta, ctx, dev):
    import torch

    edited = _signed_alpha_torch(method, delta >= 0, ctx, dev)
    if method.params.zero == "keep":
        edited = torch.where(delta != 0, edited, torch.zeros((), dtype=torch.float32, device=dev))
    return edited


def _edit_torch(method: BitDelta, base, ft, ctx):
    return edit_on_device(base, ft, ctx, ctx.device, lambda delta, ctx, dev: _edit_torch_delta(method, delta, ctx, dev))


def _decode_torch(method: BitDelta, base, stored, ctx):
    import torch

    from .torch_ops import unpack

    dev = torch_device(ctx.device)
    _, b = load_bits(base, ctx, dev)
    edited = _signed_alpha_torch(method, unpack(stored["signs0"], ctx.size, dev), ctx, dev)
    if method.params.zero == "keep":
        edited = torch.where(unpack(stored["nonzero"], ctx.size, dev), edited,
                             torch.zeros((), dtype=torch.float32, device=dev))
    return store_output(b + edited, ctx)


def _encode_torch(method: BitDelta, base, ft, ctx):
    """Packed signs (and the non-zero plane) with the exact magnitude sum: one scale per tensor."""
    from .torch_ops import fixed_sum, pack

    dev = torch_device(ctx.device)
    delta = load_bits(ft, ctx, dev)[1] - load_bits(base, ctx, dev)[1]
    stored = {"signs0": pack(delta >= 0)}
    nonzero = delta != 0 if method.params.zero == "keep" else None
    if nonzero is not None:
        stored["nonzero"] = pack(nonzero)
    post = {"abs": fixed_sum(delta if nonzero is None else delta[nonzero]),
            "count": int(delta.numel() if nonzero is None else int(nonzero.sum()))}
    return stored, post


register(BitDelta, "encode", "numba", ("BF16",))(_encode_fused)
register(BitDelta, "decode", "numba", ("BF16",))(_decode_fused)
register(BitDelta, "edit", "torch", TORCH_DTYPES)(_edit_torch)
register(BitDelta, "decode", "torch", TORCH_DTYPES)(_decode_torch)
register(BitDelta, "encode", "torch", TORCH_DTYPES)(_encode_torch)
