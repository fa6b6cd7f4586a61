"""nuslerp: slerp of two models by weights, row-wise or flattened, around an optional base
(mergekit's ``nuslerp``).

mergekit (merge_methods/nuslerp.py): t = w1 / (w0 + w1) (0.5 when |w0 + w1| < 1e-6); with a base
the two vectors are the models' deltas and the base is added back. Vectors: the whole tensor
(``nuslerp_flatten``, the default), else the vectors along the last dimension (rows), or along the
first with ``nuslerp_row_wise``. Per vector::

    u_k = v_k / max(|v_k|, 1e-7);  theta = arccos(clip(sum(u_0 u_1), -1, 1))
    out = (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)
    where |sin(theta)| < 1e-8 (colinear): out = (1 - t) v_0 + t v_1

One pass of exact sums per vector (|v_0|^2, |v_1|^2, v_0 . v_1); the write multiplies by the
vector's two float64 coefficients.
"""

from __future__ import annotations

import numpy as np

from . import sums
from .base import REQUIRED, Param, StreamedMethod, register

__all__ = ["NuSlerp"]

EPS, NORM_EPS = 1e-8, 1e-7


def _along(job) -> str:
    if job.values["nuslerp_flatten"]:
        return "whole"
    return "first" if job.values["nuslerp_row_wise"] else "rows"


def _t(weights) -> float:
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@register
class NuSlerp(StreamedMethod):
    name = "nuslerp"
    summary = "slerp of two models by weight, per row/column or flattened, optionally of their deltas from a base"
    base_model = "optional"
    params = {"weight": Param(REQUIRED, "the model's weight: t = w1 / (w0 + w1)", per_model=True),
              "nuslerp_flatten": Param(True, "one vector per tensor (else vectors along a dimension)", kind="flag"),
              "nuslerp_row_wise": Param(False, "without flatten: vectors along the first dimension, not the last",
                                        kind="flag")}

    def check_models(self, n, has_base):
        if n == 2:
            return None
        return (f"nuslerp merges two models besides the base_model, not {n} (the base can not be one of them)"
                if has_base else f"nuslerp merges exactly two models, not {n}")

    def _vectors(self, job, chunk):
        if chunk.base is None:
            return chunk.models
        return chunk.deltas()

    def passes(self, job):
        return 1

    def pass_stats(self, i, job, chunk):
        along = sums.vectors_of(job.shape, _along(job))
        return self.gram(self._vectors(job, chunk), chunk.start, along)

    def finalize(self, i, job, combined):
        g = self.gram_matrix(combined, 2)
        t = _t(job.weights())
        n0, n1 = np.maximum(np.sqrt(g[0, 0]), NORM_EPS), np.maximum(np.sqrt(g[1, 1]), NORM_EPS)
        theta = np.arccos(np.clip(g[0, 1] / (n0 * n1), -1, 1))
        sin_theta = np.sin(theta)
        colinear = np.abs(sin_theta) < EPS
        with np.errstate(divide="ignore", invalid="ignore"):
            c0 = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / sin_theta)
            c1 = np.where(colinear, t, np.sin(t * theta) / sin_theta)
        return {"c0": np.atleast_1d(c0).astype(np.float32), "c1": np.atleast_1d(c1).astype(np.float32)}

    def combine(self, job, chunk):
        v0, v1 = self._vectors(job, chunk)
        along = sums.vectors_of(job.shape, _along(job))
        if along.count == 1:
            c0, c1 = job.state["c0"][0], job.state["c1"][0]
        else:
            g = along.of(chunk.start, chunk.stop)
            c0, c1 = job.state["c0"][g], job.state["c1"][g]
        out = c0 * v0
        out += c1 * v1
        if chunk.base is not None:
            out += chunk.base
        return out

    @staticmethod
    def reference(base, models, weight=(1.0, 1.0), nuslerp_flatten=True, nuslerp_row_wise=False, **_):
        """mergekit's NuSlerpTask.execute and nuslerp(), in torch float32."""
        import torch

        t = _t(list(weight))
        tensors = [torch.from_numpy(np.asarray(m, np.float32)) for m in models]
        b = torch.from_numpy(np.asarray(base, np.float32)) if base is not None else None
        v0, v1 = (tensors[0] - b, tensors[1] - b) if b is not None else tensors
        dim = 0 if nuslerp_row_wise else -1
        out_shape = v0.shape

        def _normalize(x):
            return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_EPS)

        if nuslerp_flatten:
            v0, v1 = v0.reshape(-1), v1.reshape(-1)
        elif dim != -1:
            v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
        cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True)
        theta = torch.acos(cos_theta.clamp(-1, 1))
        sin_theta = torch.sin(theta)
        colinear = (sin_theta.abs() < EPS).squeeze()
        res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
        res[colinear] = (1 - t) * v0[colinear] + t * v1[colinear]
        if dim != -1 and not nuslerp_flatten:
            res = res.transpose(dim, -1)
        res = res.reshape(out_shape)
        return (res + b if b is not None else res).numpy()
