"""karcher: the Riemannian (Karcher) mean of the models' directions, scaled by their mean norm
(mergekit's ``karcher``).

mergekit (merge_methods/karcher.py) takes every model, the base too if one is given, with equal
weights a_i = 1/N; units u_i = x_i / |x_i| of the flattened tensors with |x_i| > tol; then from
u = normalized sum_i a_i u_i it iterates up to ``max_iter`` times::

    T = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) u),  theta_i = arccos(clip(u . u_i))
        (terms with theta_i < tol skipped);  stop when |T| < tol
    u <- cos|T| u + sin|T| T / |T|, renormalized;  out = (sum_i a_i |x_i|) u

u stays in the span of the units, so it is a vector of N coefficients c (u = sum_j c_j u_j) and
every dot product and norm is a quadratic form of the units' Gram matrix: one pass of exact sums
(x_i . x_j), then the whole iteration on N x N float64 numbers, and a write of sum_j c_j x_j.
Where mergekit iterates on tensors in the working dtype, this is that iteration in exact
arithmetic (rounded once, at the end).
"""

from __future__ import annotations

import math

import numpy as np

from . import sums
from .base import Param, StreamedMethod, register

__all__ = ["Karcher", "karcher_coefficients"]


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The output's coefficients on the models' tensors x_i, from their Gram matrix."""
    n = gram.shape[0]
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    alphas = np.full(n, 1.0 / n)
    valid = [i for i in range(n) if norms[i] > tol]
    out = np.zeros(n)
    if not valid:
        return out
    a = alphas[valid] / alphas[valid].sum()
    nv = norms[valid]
    units = gram[np.ix_(valid, valid)] / np.outer(nv, nv)  # u_j . u_k

    def norm(c):
        return math.sqrt(max(float(c @ units @ c), 0.0))

    c = a.copy()
    norm_u = norm(c)
    c = np.eye(len(valid))[0] if norm_u < tol else c / norm_u
    for _ in range(max_iter):
        t = np.zeros_like(c)
        dots = units @ c  # u . u_j
        for j, aj in enumerate(a):
            dot = min(max(float(dots[j]), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            e = np.zeros_like(c)
            e[j] = 1.0
            t += aj * (theta / math.sin(theta)) * (e - dot * c)
        norm_t = norm(t)
        if norm_t < tol:
            break
        c = math.cos(norm_t) * c + math.sin(norm_t) * (t / norm_t)
        u_norm = norm(c)
        if u_norm > tol:
            c = c / u_norm
    scale = float(alphas @ norms)
    out[valid] = scale * c / nv
    return out


@register
class Karcher(StreamedMethod):
    name = "karcher"
    summary = "Riemannian (Karcher) mean of the models' directions, times their mean norm (base is one more model)"
    base_model = "member"
    params = {"max_iter": Param(10, "iterations at most", kind="int", low=0),
              "tol": Param(1e-5, "convergence tolerance (and the norm under which a model is left out)", low=0)}

    def passes(self, job):
        return 1 if len(job.models) > 1 else 0

    def pass_stats(self, i, job, chunk):
        return self.gram(chunk.models, chunk.start, sums.WHOLE)

    def finalize(self, i, job, combined):
        g = self.gram_matrix(combined, len(job.models))
        return {"coef": karcher_coefficients(g, int(job.values["max_iter"]), float(job.values["tol"])).tolist()}

    def combine(self, job, chunk):
        if len(chunk.models) == 1:
            return chunk.models[0].copy()
        out = np.zeros_like(chunk.models[0])
        for c, x in zip(job.state["coef"], chunk.models):
            if c:
                out += np.float32(c) * x
        return out

    @staticmethod
    def reference(base, models, max_iter=10, tol=1e-5, **_):
        """mergekit's karcher_merge_tensors(), in torch float32 (models: the base included)."""
        import torch

        tensors = [torch.from_numpy(np.asarray(m, np.float32)) for m in models]
        if len(tensors) == 1:
            return tensors[0].numpy()
        alphas = [1.0 / len(tensors)] * len(tensors)
        norms, units = [], []
        for t in tensors:
            n = torch.linalg.norm(t)
            if n.item() == 0.0:
                norms.append(0.0)
                units.append(torch.zeros_like(t))
            else:
                norms.append(n.item())
                units.append(t / n)
        valid = [i for i, n in enumerate(norms) if n > tol]
        if not valid:
            return torch.zeros_like(tensors[0]).numpy()
        va = [alphas[i] for i in valid]
        na = [x / sum(va) for x in va]
        vu = [units[i] for i in valid]
        u = torch.zeros_like(vu[0])
        for x, ui in zip(na, vu):
            u += x * ui
        norm_u = torch.linalg.norm(u).item()
        u = vu[0].clone() if norm_u < tol else u / norm_u
        for _ in range(max_iter):
            big_t = torch.zeros_like(u)
            for x, ui in zip(na, vu):
                dot = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                big_t += x * (theta / torch.sin(theta)) * (ui - dot * u)
            norm_t = torch.linalg.norm(big_t)
            if norm_t.item() < tol:
                break
            u = torch.cos(norm_t) * u + torch.sin(norm_t) * (big_t / norm_t)
            u_norm = torch.linalg.norm(u)
            if u_norm.item() > tol:
                u = u / u_norm
        s = sum(x * n for x, n in zip(alphas, norms))
        return (s * u).numpy()
