"""passthrough: one model's tensors, optionally scaled (mergekit's ``passthrough``).

mergekit (merge_methods/passthrough.py) takes exactly one tensor per output tensor and multiplies
it by the model's ``scale`` if one is set. With ``models:`` that is one model for every tensor (the
base, if given, must be that model); frankenmerges take one source per slice (``merging.slices``).
"""

from __future__ import annotations

import numpy as np

from .base import Param, StreamedMethod, register

__all__ = ["Passthrough"]


@register
class Passthrough(StreamedMethod):
    name = "passthrough"
    summary = "one model's tensors, each optionally times the model's scale"
    base_model = "member"
    params = {"scale": Param(None, "factor on the model's tensor (none: copied as it is)", per_model=True)}

    def check_models(self, n, has_base):
        return None if n == 1 else (f"passthrough takes exactly one model (the base_model counts as one), not {n}; "
                                    "for layers of several models use slices, one source each")

    def combine(self, job, chunk):
        scale = job.model_values[0].get("scale")
        return self.reference(None, chunk.models, scale=scale)

    @staticmethod
    def reference(base, models, scale=None, **_):
        x = np.asarray(models[0], np.float32)
        return x * np.float32(scale) if scale is not None else x.copy()
