"""nearswap: take the other model's value where it is near the base's (mergekit's ``nearswap``).

mergekit (merge_methods/nearswap.py), element by element, with a the base and b the one model::

    weight = clip(t / max(|a - b|, 1e-6), 0, 1);  out = weight * b + (1 - weight) * a

No pass: every figure is the element's own.
"""

from __future__ import annotations

import numpy as np

from .base import REQUIRED, Param, StreamedMethod, register

__all__ = ["NearSwap"]


@register
class NearSwap(StreamedMethod):
    name = "nearswap"
    summary = "element-wise: the model's value where |model - base| is under t, blended by t/|diff| above"
    params = {"t": Param(REQUIRED, "distance under which the model's value is taken whole")}

    def check_models(self, n, has_base):
        return None if n == 1 else f"nearswap takes the base_model and one other model, not {n} others"

    def combine(self, job, chunk):
        a, b = chunk.base, chunk.models[0]
        assert a is not None
        return self.reference(a, [b], t=job.values["t"])

    @staticmethod
    def reference(base, models, t=0.0, **_):
        a, b = base.astype(np.float32), models[0].astype(np.float32)
        weight = np.clip(np.float32(t) / np.maximum(np.abs(a - b), np.float32(1e-6)), 0, 1).astype(np.float32)
        return weight * b + (1 - weight) * a
