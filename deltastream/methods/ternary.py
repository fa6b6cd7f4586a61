"""Ternary Weight Networks (Li, Zhang & Liu 2016, arXiv:1605.04711) applied to the delta.

Each entry becomes -alpha, 0 or +alpha, with TWN's threshold rule::

    m      = mean |delta|                       over the tensor (one pre pass, exact sums)
    cut    = float32(threshold * m)             (TWN: threshold 0.7)
    kept   = |delta| > cut                      (float32 comparison)
    alpha  = float32(scale * (S / count))       S: exact sum of |delta| over kept, count: kept
    edited = alpha * sign(delta) where kept, else 0

alpha depends only on the kept entries, which the cut fixes before the write pass, so it is a
post figure: compress stays one pass after the mean. A tensor with no kept entry gets alpha 0.
Stored per chunk: ``kept``, one packed bit per element, and ``signs``, one bit per kept entry
(1: positive) packed at the chunk's front; alpha is in the tensor's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..device import TORCH_DTYPES, edit_on_device
from ..exact import magnitude_sum, total
from ..params import check_range, field
from ..scratch import scratch
from .backends import register
from .base import Encoding
from .packing import pack, packed_array, unpack

__all__ = ["Ternary"]


@dataclass(frozen=True)
class TernaryParams:
    threshold: float = field(0.7, "entries with |delta| > threshold * mean|delta| are kept (TWN: 0.7)")
    scale: float = field(1.0, "multiple of the kept entries' mean magnitude used as alpha")

    def __post_init__(self):
        check_range("ternary", "threshold", self.threshold, 0.0, None, low_open=True)
        check_range("ternary", "scale", self.scale, 0.0, None, low_open=True)


class Ternary(Encoding):
    method_id = "ternary"
    Params = TernaryParams
    summary = "TWN ternary delta: +-alpha where |delta| > threshold * mean|delta|, else 0 (two bit planes)"
    examples = ({"threshold": 0.5}, {"threshold": 1.2, "scale": 0.5})

    def pre_passes(self, shape):
        return 1

    def pre_stats(self, i, delta, ctx):
        return {"abs": magnitude_sum(delta), "count": delta.size}

    def finalize_pre(self, i, combined, state):
        count = combined["count"] if combined else 0
        mean = total(combined["abs"]) / count if count else 0.0
        return {**state, "_cut": float(np.float32(self.params.threshold * mean))}

    def _kept(self, delta, ctx) -> np.ndarray:
        return np.greater(np.abs(delta, out=scratch("ternary.abs", delta.size, np.float32)),
                          np.float32(ctx.state["_cut"]), out=scratch("ternary.kept", delta.size, bool))

    def post_stats(self, delta, ctx):
        kept = self._kept(delta, ctx)
        return {"abs_kept": magnitude_sum(delta, kept), "kept": int(kept.sum())}

    def finalize_post(self, combined, state):
        count = combined["kept"] if combined else 0
        alpha = self.params.scale * (total(combined["abs_kept"]) / count) if count else 0.0
        return {**state, "alpha": float(np.float32(alpha))}

    def state_layout(self, shape):
        return {"alpha": ("number", ())}

    def stored_arrays(self, dtype, shape, chunk_elems, state):
        numel = math.prod(shape)
        return [packed_array("kept", chunk_elems, numel),
                packed_array("signs", chunk_elems, numel, compression="front")]

    def encode_delta(self, delta, base, ft, ctx):
        kept = self._kept(delta, ctx)
        return {"kept": pack(kept), "signs": pack(delta[kept] > 0)}

    def decode_delta(self, stored, base, ctx):
        kept = unpack(stored["kept"], ctx.size)
        positive = unpack(stored["signs"], int(kept.sum()))
        alpha = np.float32(ctx.state["alpha"])
        edited = scratch("ternary.edited", ctx.size, np.float32)
        edited[...] = 0
        edited[kept] = kernels.select(positive, alpha, -alpha, np.empty(positive.size, np.float32))
        return edited

    def edit_delta(self, delta, ctx):
        """decode(encode()) in one pass over the chunk, with the same bits."""
        kept = self._kept(delta, ctx)
        alpha = np.float32(ctx.state["alpha"])
        edited = kernels.select(delta > 0, alpha, -alpha, scratch("ternary.edited", delta.size, np.float32))
        edited[~kept] = 0
        return edited


def _edit_torch(method: Ternary, base, ft, ctx):
    import torch

    from .torch_ops import scalar

    def edit(delta, ctx, dev):
        alpha = scalar(ctx.state["alpha"], dev)
        signed = torch.where(delta > 0, alpha, -alpha)
        return torch.where(delta.abs() > scalar(ctx.state["_cut"], dev), signed, torch.zeros((), device=dev))
    return edit_on_device(base, ft, ctx, ctx.device, edit)


register(Ternary, "edit", "torch", TORCH_DTYPES)(_edit_torch)
