"""sce: select by variance, calculate weights by energy, erase by sign (Wan et al. 2024;
mergekit's ``sce``).

mergekit (merge_methods/sce.py), with task vectors tau_i = model_i - base::

    select_topk < 1: keep, in every tau_i, the elements where the models' variance
        var = mean_i (tau_i - mean_j tau_j)^2 is among the k = int(count(var != 0) * select_topk)
        largest of the tensor (none when select_topk <= 0)
    erase:  m_i = sign(tau_i) == (+1 if sum_j tau_j >= 0 else -1)
    weights: e_i = mean(tau_i^2) over the tensor; w_i = e_i / sum_j e_j (1/N when the sum < 1e-6)
    out = base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)

Passes: the top-k of the variance is an exact rank search (``deltastream.ranks``: two histogram
passes, then a pass counting each chunk's ties; equal variances are ranked by position, later
ones kept, where torch.topk picks any); then one pass of exact sums of tau_i^2 (after the
selection). Without selection only the last.
"""

from __future__ import annotations

import numpy as np

from ... import kernels, ranks
from . import sums
from .base import Chunk, Param, StreamedMethod, register

__all__ = ["Sce"]

WIDTHS = ranks.digit_widths(1)
_SELECT_PASSES = len(WIDTHS) + 1


def _variance(taus: list[np.ndarray]) -> np.ndarray:
    mean = taus[0].copy()
    for t in taus[1:]:
        mean += t
    mean /= np.float32(len(taus))
    var = np.zeros_like(mean)
    for t in taus:
        d = t - mean
        var += d * d
    var /= np.float32(len(taus))
    return var


def _selecting(job) -> bool:
    return 0 < float(job.values["select_topk"]) < 1


@register
class Sce(StreamedMethod):
    name = "sce"
    summary = "keep the top-variance elements, weight models by delta energy, erase minority signs (SCE)"
    params = {"select_topk": Param(1.0, "fraction of elements kept, by the models' variance (1: all)"),
              "int8_mask": Param(False, "mergekit's memory option (no effect here)", kind="flag")}

    def check_models(self, n, has_base):
        return None if n >= 1 else "sce needs at least one model besides the base_model"

    def passes(self, job):
        if float(job.values["select_topk"]) <= 0:
            return 0  # nothing selected: the base
        return (_SELECT_PASSES if _selecting(job) else 0) + 1

    def _taus(self, job, chunk: Chunk) -> list[np.ndarray]:
        """The task vectors, selected (zero where the variance is not in the top k)."""
        taus = chunk.deltas()
        if _selecting(job) and "_offsets" in job.state:
            keep = self._keep(job, chunk, taus)
            for t in taus:
                t[~keep] = 0
        elif float(job.values["select_topk"]) <= 0 or job.state.get("none"):
            for t in taus:
                t[:] = 0
        return taus

    def _keep(self, job, chunk, taus) -> np.ndarray:
        bits = _variance(taus).view(np.uint32)
        block = ranks.assign(bits, job.state["_search"], job.state["_offsets"][job.name][chunk.index])
        return block == 1

    def pass_stats(self, i, job, chunk):
        if _selecting(job) and i < _SELECT_PASSES:
            bits = _variance(chunk.deltas()).view(np.uint32)
            if i == 0:
                return {"hist": ranks.histogram(bits), "zeros": int(np.count_nonzero(bits == 0))}
            if i < len(WIDTHS):
                return {"hist": ranks.histogram(bits, job.state["_search"])}
            return ranks.tie_partial(bits, job.state["_search"], (job.name, chunk.index))
        return {f"energy{k}": sums.product_sum(t, t) for k, t in enumerate(self._taus(job, chunk))}

    def finalize(self, i, job, combined):
        state = dict(job.state)
        if _selecting(job) and i < _SELECT_PASSES:
            if i == 0:
                n = job.numel
                k = int((n - combined["zeros"]) * float(job.values["select_topk"]))
                if k == 0:
                    return {"none": True, "_skip_to": _SELECT_PASSES}
                search = ranks.new_search(n, [n - k], WIDTHS)
                return {**state, "_search": ranks.refine(search, combined["hist"])}
            if i < len(WIDTHS):
                return {**state, "_search": ranks.refine(state["_search"], combined["hist"])}
            return {**state, "_offsets": ranks.tie_offsets(state["_search"], combined["ties_list"])}
        energy = np.array([sums.value(combined[f"energy{k}"]) for k in range(len(job.models))]) / max(job.numel, 1)
        total = float(energy.sum())
        weights = np.full(len(energy), 1.0 / len(energy)) if abs(total) < 1e-6 else energy / total
        return {**state, "weights": weights.tolist()}

    def combine(self, job, chunk):
        taus = self._taus(job, chunk)
        weights = job.state.get("weights") or [1.0 / len(taus)] * len(taus)
        total = taus[0].copy()
        for t in taus[1:]:
            total += t
        sign = kernels.select(total >= 0, np.float32(1), np.float32(-1), np.empty_like(total))
        merged = np.zeros_like(total)
        divisor = np.zeros_like(total)
        for t, w in zip(taus, weights):
            agree = np.sign(t) == sign
            merged += np.where(agree, np.float32(w) * t, np.float32(0))
            divisor += np.where(agree, np.float32(w), np.float32(0))
        merged /= np.maximum(divisor, np.float32(1e-6))
        merged += chunk.base
        return merged

    @staticmethod
    def reference(base, models, select_topk=1.0, **_):
        """mergekit's sce_merge(), in torch float32, with torch.topk's ties broken as here (by
        position, later kept) so that the comparison is exact."""
        import torch

        b = torch.from_numpy(np.asarray(base, np.float32))
        tvs = torch.stack([torch.from_numpy(np.asarray(m, np.float32)) - b for m in models], dim=0)
        if select_topk < 1:
            if select_topk <= 0:
                mask = torch.zeros_like(tvs[0])
            else:
                var = torch.from_numpy(_variance([t.numpy().copy() for t in tvs]))
                k = int(torch.count_nonzero(var) * select_topk)
                mask = torch.zeros_like(var)
                if k:
                    flat = var.reshape(-1).numpy()
                    order = np.lexsort((np.arange(flat.size), flat))
                    mask.view(-1)[torch.from_numpy(order[flat.size - k:].copy())] = 1
            tvs = tvs * mask.unsqueeze(0)
        sign = tvs.sign()
        majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
        erase = sign == majority
        weights = torch.mean(tvs**2, dim=list(range(1, tvs.dim())))
        total = torch.sum(weights).item()
        weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
        while weights.dim() < tvs.dim():
            weights = weights.unsqueeze(-1)
        erased = weights * erase
        merged = (tvs * erased).sum(dim=0)
        return (b + merged / torch.sum(erased, dim=0).clamp(min=1e-6)).numpy()
