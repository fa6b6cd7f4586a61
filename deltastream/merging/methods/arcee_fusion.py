"""arcee_fusion: take the model's change where it matters most (mergekit's ``arcee_fusion``).

mergekit (merge_methods/arcee_fusion.py), with a the base and b the one model, per row (the last
dimension; a 1-D tensor is one row)::

    p = softmax(b) + 1e-8;  q = softmax(a) + 1e-8;  kl = sum_row p log(p / q)
    importance = |b - a| * kl
    threshold = median + 1.5 (q3 - q1) of the importance, the quantile q being the element of
        rank floor(q (n - 1)) in sorted order
    out = a + (b - a) where importance >= threshold, else a

The softmax is per row, so every chunk holds whole rows and the importance is a chunk's own
figure. The three quantiles are exact order statistics (``deltastream.ranks``: two histogram
passes, one search with three boundaries), where mergekit sorts a random sample of a million
elements once a tensor has more. The importance is computed in float64 and rounded to float32
(clamped at 0: a KL divergence of equal-mass measures, negative only by rounding): mergekit's
float32 KL of two nearly equal softmaxes is mostly rounding noise (its order-delta terms cancel
to an order-delta^2 sum), so its masks differ from these in a sizeable fraction of elements.
"""

from __future__ import annotations

import numpy as np

from ... import ranks
from .base import StreamedMethod, register

__all__ = ["ArceeFusion", "importance"]

WIDTHS = ranks.digit_widths(3)
QUANTILES = (0.25, 0.5, 0.75)
EPS = 1e-8
SLICE = 1 << 20


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def importance(base: np.ndarray, model: np.ndarray, row: int) -> np.ndarray:
    """|b - a| * KL(softmax(b) || softmax(a)) of the rows (float32, >= 0), flat; computed a block
    of rows at a time (its float64 temporaries stay near 1 Mi elements)."""
    out = np.empty(base.size, np.float32)
    step = max(1, SLICE // row) * row
    for s in range(0, base.size, step):
        a = base[s:s + step].astype(np.float64).reshape(-1, row)
        b = model[s:s + step].astype(np.float64).reshape(-1, row)
        p = _softmax(b) + EPS
        q = _softmax(a) + EPS
        kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
        out[s:s + step] = np.maximum(np.abs(b - a) * kl, 0).reshape(-1)
    return out


def _ranks(n: int) -> list[int]:
    return [int(np.float32(q) * np.float32(n - 1)) for q in QUANTILES]


def threshold(q1: np.float32, median: np.float32, q3: np.float32) -> np.float32:
    """mergekit's median + 1.5 IQR, in float32."""
    return np.float32(median + np.float32(1.5) * np.float32(q3 - q1))


def _row(shape) -> int:
    return shape[-1] if len(shape) >= 1 and shape[-1] else 1


@register
class ArceeFusion(StreamedMethod):
    name = "arcee_fusion"
    summary = "the model's change where |delta| x the rows' softmax KL is an outlier (median + 1.5 IQR)"
    whole_rows = True

    def check_models(self, n, has_base):
        return None if n == 1 else f"arcee_fusion takes the base_model and one other model, not {n} others"

    def passes(self, job):
        return len(WIDTHS) if job.numel else 0

    def pass_stats(self, i, job, chunk):
        bits = importance(chunk.base, chunk.models[0], _row(job.shape)).view(np.uint32)
        return {"hist": ranks.histogram(bits, job.state.get("_search") if i else None)}

    def finalize(self, i, job, combined):
        search = job.state.get("_search") or ranks.new_search(job.numel, _ranks(job.numel), WIDTHS)
        search = ranks.refine(search, combined["hist"])
        if i + 1 < len(WIDTHS):
            return {"_search": search}
        values = ranks.thresholds(search)[0]  # the three boundaries' values, as uint32
        q1, median, q3 = (np.uint32(v).view(np.float32) for v in values)
        return {"threshold": float(threshold(q1, median, q3))}

    def combine(self, job, chunk):
        a, b = chunk.base, chunk.models[0]
        if not job.numel:
            return a.copy()
        keep = importance(a, b, _row(job.shape)) >= np.float32(job.state["threshold"])
        return a + (b - a) * keep  # mergekit's base + delta * mask (not b itself: a + (b - a) rounds)

    @staticmethod
    def reference(base, models, **_):
        """mergekit's ArceeFusionMergeTask on a small tensor (no sampling: under 1e6 elements),
        with this module's float64 importance."""
        a, b = np.asarray(base, np.float32), np.asarray(models[0], np.float32)
        imp = importance(a, b, _row(a.shape))
        s = np.sort(imp)
        q1, median, q3 = (s[r] for r in _ranks(s.size))
        keep = (imp >= threshold(q1, median, q3)).reshape(a.shape)
        return a + (b - a) * keep
