"""model_stock: move the base toward the models' average by their deltas' mean angle
(Jang et al. 2024; mergekit's ``model_stock``).

mergekit (merge_methods/model_stock.py), with w_0 the base and w_1..w_N the models (N >= 2),
offsets o_i = w_i - w_0 flattened (or, with ``filter_wise``, per row: vectors along the last
dimension, a 1-D tensor one row)::

    cos = mean over pairs i < j of clip(o_i . o_j / max(|o_i| |o_j|, 1e-6), -1, 1)
    t = N cos / (1 + (N - 1) cos);  out = t * (sum_i w_i) / N + (1 - t) * w_0

One pass of exact sums per vector: every o_i . o_j (i <= j).
"""

from __future__ import annotations

import numpy as np

from . import sums
from .base import Param, StreamedMethod, register

__all__ = ["ModelStock"]


def _along(job) -> str:
    return "rows" if job.values["filter_wise"] else "whole"


@register
class ModelStock(StreamedMethod):
    name = "model_stock"
    summary = "the models' average pulled toward the base by their deltas' mean pairwise angle (Model Stock)"
    params = {"filter_wise": Param(False, "one angle per row (vectors along the last dimension), not per tensor",
                                   kind="flag")}

    def check_models(self, n, has_base):
        return None if n >= 2 else f"model_stock needs at least two models besides the base_model, not {n}"

    def passes(self, job):
        return 1

    def pass_stats(self, i, job, chunk):
        return self.gram(chunk.deltas(), chunk.start, sums.vectors_of(job.shape, _along(job)))

    def finalize(self, i, job, combined):
        n = len(job.models)
        g = self.gram_matrix(combined, n)
        cos = [np.clip(g[i, j] / np.maximum(np.sqrt(g[i, i]) * np.sqrt(g[j, j]), 1e-6), -1, 1)
               for i in range(n) for j in range(i + 1, n)]
        cos_theta = np.mean(np.stack(cos), axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
        return {"t": np.atleast_1d(t).astype(np.float32)}

    def combine(self, job, chunk):
        along = sums.vectors_of(job.shape, _along(job))
        t = job.state["t"][0] if along.count == 1 else job.state["t"][along.of(chunk.start, chunk.stop)]
        avg = chunk.models[0].copy()
        for m in chunk.models[1:]:
            avg += m
        avg /= np.float32(len(chunk.models))
        out = t * avg
        out += (np.float32(1) - t) * chunk.base
        return out

    @staticmethod
    def reference(base, models, filter_wise=False, **_):
        """mergekit's ModelStockMergeTask.execute, in torch float32."""
        import torch

        w_0 = torch.from_numpy(np.asarray(base, np.float32))
        ws = [torch.from_numpy(np.asarray(m, np.float32)) for m in models]
        out_shape = w_0.shape
        if filter_wise:
            if w_0.dim() == 1:
                w_0 = w_0.unsqueeze(0)
                ws = [w.unsqueeze(0) for w in ws]
        else:
            w_0 = w_0.view(-1)
            ws = [w.view(-1) for w in ws]
        offsets = [w - w_0 for w in ws]
        cos_thetas = []
        for i, a in enumerate(offsets):
            for j in range(i + 1, len(offsets)):
                b = offsets[j]
                norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
        n = len(ws)
        t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
        w_avg = sum(ws) / len(ws)
        return (t * w_avg + (1 - t) * w_0).reshape(out_shape).numpy()
