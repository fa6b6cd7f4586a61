"""multislerp: barycentric interpolation of many models on a hypersphere (mergekit's ``multislerp``).

mergekit (merge_methods/multislerp.py), with x_i the models (their deltas when a base is given,
the base added back), each flattened, w the weights (divided by their sum with
``normalize_weights``, the default)::

    n_i = |x_i|;  u_i = x_i / (n_i + eps);  mean = sum_i w_i u_i
    |mean| < eps: two models -> w_0 x_0 + w_1 x_1; more -> an error
    m = mean / |mean|;  tangent = sum_i w_i (u_i - (u_i . m) m);  out = (m cos|tangent| +
        tangent sin|tangent| / |tangent|) * sum_i w_i n_i     (|tangent| with + eps)

Every figure is a function of the Gram matrix x_i . x_j: one pass of exact sums. The tangent is
zero in exact arithmetic (sum_i w_i (u_i . m) = m . mean = |mean|), so out = m * sum_i w_i n_i:
mergekit's tangent is its float rounding (below a float32 ulp of the output), which is dropped.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import ParameterError, tensor_context
from . import sums
from .base import REQUIRED, Param, StreamedMethod, register

__all__ = ["MultiSlerp"]


@register
class MultiSlerp(StreamedMethod):
    name = "multislerp"
    summary = "barycentric interpolation of any number of models on the hypersphere, optionally of their deltas"
    base_model = "optional"
    params = {"weight": Param(REQUIRED, "the model's weight", per_model=True),
              "normalize_weights": Param(True, "divide the weights by their sum", kind="flag"),
              "eps": Param(1e-8, "small constant of the norms", low=0)}

    def _vectors(self, chunk):
        return chunk.models if chunk.base is None else chunk.deltas()

    def passes(self, job):
        return 1 if len(job.models) > 1 else 0

    def pass_stats(self, i, job, chunk):
        return self.gram(self._vectors(chunk), chunk.start, sums.WHOLE)

    def check_tensor(self, job):
        if job.values["normalize_weights"] and len(job.models) > 1 and sum(job.weights()) == 0:
            return "the weights sum to 0: normalize_weights cannot divide by it"
        return None

    def _weights(self, job) -> np.ndarray:
        w = np.array(job.weights(), np.float64)
        return w / w.sum() if job.values["normalize_weights"] else w

    def finalize(self, i, job, combined):
        n = len(job.models)
        g = self.gram_matrix(combined, n)
        w, eps = self._weights(job), float(job.values["eps"])
        norms = np.sqrt(np.diag(g))
        a = w / (norms + eps)  # mean = sum_i a_i x_i
        mean_norm = math.sqrt(max(float(a @ g @ a), 0.0))
        if mean_norm < eps:
            if n == 2:
                return {"coef": w.tolist()}
            raise ParameterError(f"{tensor_context(job.models[0].path, job.name)}: multislerp: the weighted sum "
                                 "of the models' directions is zero (antipodal models whose weights balance): "
                                 "try other weights")
        scale = float(norms @ w) * math.cos(eps) / mean_norm
        return {"coef": (a * scale).tolist()}

    def combine(self, job, chunk):
        vectors = self._vectors(chunk)
        if len(vectors) == 1:
            return chunk.models[0].copy()
        out = np.float32(job.state["coef"][0]) * vectors[0]
        for c, v in zip(job.state["coef"][1:], vectors[1:]):
            out += np.float32(c) * v
        if chunk.base is not None:
            out += chunk.base
        return out

    @staticmethod
    def reference(base, models, weight=(), normalize_weights=True, eps=1e-8, **_):
        """mergekit's multislerp(), in torch float32."""
        import torch

        if len(models) == 1:
            return np.asarray(models[0], np.float32)
        tensors = torch.stack([torch.from_numpy(np.asarray(m, np.float32)) for m in models], dim=0)
        b = torch.from_numpy(np.asarray(base, np.float32)) if base is not None else None
        if b is not None:
            tensors -= b
        flat = tensors.view(tensors.shape[0], -1)
        weights = torch.tensor(list(weight), dtype=tensors.dtype)
        if normalize_weights:
            weights = weights / weights.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        unit = flat / (norms + eps)
        mean = (unit * weights.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            res = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
            return (res + b if b is not None else res).numpy()
        mean = mean / mean_norm
        dots = (unit * mean).sum(-1, keepdim=True)
        tangent = ((unit - dots * mean) * weights.view(-1, 1)).sum(0)
        tangent_norm = torch.norm(tangent) + eps
        result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        result = (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
        return (result + b if b is not None else result).numpy()
