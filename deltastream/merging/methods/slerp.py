"""slerp: spherical interpolation between the base and one other model (mergekit's ``slerp``).

mergekit (merge_methods/slerp.py) flattens both tensors, normalizes copies (a norm of at most
eps = 1e-8 leaves a copy as it is), and takes their dot product; when |dot| > 0.9995 the two are
nearly colinear and it interpolates linearly::

    lerp:  out = (1 - t) * a + t * b
    slerp: theta = arccos(dot);  out = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

with a the base's tensor and b the other model's, ``t`` per tensor (a number, a gradient over
the layers, or a list of {filter, value}). One pass: sum(a*a), sum(b*b), sum(a*b), exact
(``methods.sums``); the coefficients are then float64 scalars, the combine two multiply-adds.
"""

from __future__ import annotations

import math

import numpy as np

from . import sums
from .base import REQUIRED, Chunk, Param, StreamedMethod, TensorJob, register

__all__ = ["Slerp", "slerp_coefficients", "DOT_THRESHOLD", "EPS"]

DOT_THRESHOLD, EPS = 0.9995, 1e-8


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(s0, s1) of out = s0 * a + s1 * b from the exact sums, with mergekit's thresholds."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


@register
class Slerp(StreamedMethod):
    name = "slerp"
    summary = "spherical interpolation between the base and one model (mergekit's slerp)"
    params = {"t": Param(REQUIRED, "interpolation factor: 0 is the base, 1 the other model")}

    def check_models(self, n, has_base):
        return None if n == 1 else f"slerp interpolates the base_model and one other model, not {n} others"

    def passes(self, job):
        return 1

    def pass_stats(self, i, job, chunk):
        a, b = chunk.base, chunk.models[0]
        return {"aa": sums.product_sum(a, a), "bb": sums.product_sum(b, b), "ab": sums.product_sum(a, b)}

    def finalize(self, i, job, combined):
        s0, s1 = slerp_coefficients(float(job.values["t"]), *(sums.value(combined[k]) for k in ("aa", "bb", "ab")))
        return {"s0": s0, "s1": s1}

    def combine(self, job: TensorJob, chunk: Chunk) -> np.ndarray:
        assert chunk.base is not None
        out = chunk.base * np.float32(job.state["s0"])
        out += np.float32(job.state["s1"]) * chunk.models[0]
        return out

    @staticmethod
    def reference(base, models, t=0.5, **_):
        """mergekit's slerp(), line for line, in float32 numpy."""
        v0, v1 = base.astype(np.float32), models[0].astype(np.float32)
        c0, c1 = v0.copy(), v1.copy()

        def normalize(v):
            n = np.linalg.norm(v)
            return v / n if n > EPS else v

        v0, v1 = normalize(v0), normalize(v1)
        dot = np.sum(v0 * v1)
        if np.abs(dot) > DOT_THRESHOLD:
            return (1 - t) * c0 + t * c1
        theta_0 = np.arccos(dot)
        sin_theta_0 = np.sin(theta_0)
        theta_t = theta_0 * t
        s0 = np.sin(theta_0 - theta_t) / sin_theta_0
        s1 = np.sin(theta_t) / sin_theta_0
        return s0 * c0 + s1 * c1
