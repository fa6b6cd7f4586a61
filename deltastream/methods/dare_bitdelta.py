"""DARE + BitDelta in one artifact: the densest storage deltastream offers.

The drop mask is DARE's (regenerated from the seed, so the same seed drops the same entries as
``dare``); of the kept entries only the signs are stored, packed at the front of each chunk, and
one scale per tensor::

    edited = (1 - M) * sign(delta) * alpha * factor
    alpha  = scale * mean over kept entries of |delta|,   factor = 1/(1-p) (inverse) or 1 (none)

so that, in expectation over the mask, the edit is BitDelta's ``sign(delta) * mean|delta|``. At
p = 0.9 a kept sign costs 1 bit for 10 entries: 0.1 bit per parameter, plus the scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..exact import magnitude_sum, total
from ..params import check_range, field
from ..scratch import scratch
from .base import Encoding
from .dare import keep_mask
from .packing import pack, packed_array, unpack

__all__ = ["DareBitDelta"]


@dataclass(frozen=True)
class DareBitDeltaParams:
    p: float = field(0.9, "drop rate: the probability that a delta entry is dropped")
    rescale: str = field("inverse", "kept entries x 1/(1-p) (inverse) or x 1 (none)", choices=("inverse", "none"))
    scale: float = field(1.0, "multiple of the kept entries' mean magnitude used as the scale")

    def __post_init__(self):
        check_range("dare_bitdelta", "p", self.p, 0.0, 1.0, high_open=True)
        check_range("dare_bitdelta", "scale", self.scale, 0.0, None, low_open=True)


class DareBitDelta(Encoding):
    method_id = "dare_bitdelta"
    Params = DareBitDeltaParams
    summary = "DARE's random drop, then the signs of the kept entries and one scale (densest storage)"
    examples = ({"p": 0.5}, {"p": 0.5, "rescale": "none"})

    def state_layout(self, shape):
        return {"alpha": ("number", ())}

    def stored_arrays(self, dtype, shape, chunk_elems, state):
        return [packed_array("signs", chunk_elems, math.prod(shape), compression="front")]

    def post_stats(self, delta, ctx):
        keep = keep_mask(ctx, self.params.p)
        return {"abs_kept": magnitude_sum(delta, keep), "kept": int(keep.sum())}

    def finalize_post(self, combined, state):
        kept = combined["kept"] if combined else 0
        mean = total(combined["abs_kept"]) / kept if kept else 0.0
        factor = 1.0 / (1.0 - self.params.p) if self.params.rescale == "inverse" else 1.0
        return {**state, "alpha": self.params.scale * mean * factor}

    def encode_delta(self, delta, base, ft, ctx):
        keep = keep_mask(ctx, self.params.p)
        return {"signs": pack(delta[keep] >= 0)}

    def decode_delta(self, stored, base, ctx):
        keep = keep_mask(ctx, self.params.p)
        positive = unpack(stored["signs"], int(keep.sum()))
        edited = scratch("dare_bitdelta.edited", ctx.size, np.float32)
        edited[...] = 0
        alpha = np.float32(ctx.state["alpha"])
        edited[keep] = np.where(positive, alpha, -alpha)
        return edited
