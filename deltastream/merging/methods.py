"""The merge methods: mergekit's generalized task arithmetic, on streamed chunks.

Per tensor, with delta_i = f32(model_i) - f32(base) and w_i the model's weight::

    delta_i' = sparsify_i(delta_i)                    (trim, DARE, DELLA or breadcrumbs; or none)
    with consensus:  m_i = sign(w_i delta_i') == sign(sum_j w_j delta_j')   (sum >= 0 counts as +;
                     a zero never agrees);  mixed = sum m_i w_i delta_i';  divisor = sum m_i w_i
    without:         mixed = sum w_i delta_i';  divisor = sum w_i
    mixed /= divisor if normalize;  out = base + lambda * mixed
    linear:          out = sum w_i model_i / (sum w_i if normalize)

Every divisor whose magnitude is under 1e-8 becomes 1 (mergekit's rule for task arithmetic; its
consensus path maps only 0, its linear none): weights that cancel give the plain weighted sum,
never an infinite merge.

``consensus: official`` uses the official TIES rule instead: the sign of the unweighted sum elects,
and the merge is the unweighted mean of the agreeing deltas (weights ignored).
The sparsifiers are deltastream's own methods, keyed per model so that each model's mask depends
only on (seed, model, tensor, element): adding a model or reordering tensors changes no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..exact import NonFinite, magnitude_sum
from ..methods.base import ChunkContext, LossyMethod
from ..methods.dare import Dare, l1_factor
from ..methods.trim import Trim
from ..rng import uniform_u32

__all__ = ["MergeSpec", "MERGE_METHODS", "sparsifier", "TopK", "Outliers", "DellaPrune", "TINY_DIVISOR"]

TINY_DIVISOR = 1e-8  # a normalising divisor under this in magnitude becomes 1


@dataclass(frozen=True)
class MergeSpec:
    consensus: bool
    sparsify: str | None  # magnitude | random | della | outliers
    normalize: bool
    rescale: bool


#: mergekit's registry (merge_methods/registry.py): consensus, sparsification, defaults
MERGE_METHODS = {
    "linear": MergeSpec(False, None, True, False),
    "task_arithmetic": MergeSpec(False, None, False, False),
    "ties": MergeSpec(True, "magnitude", True, False),
    "dare_ties": MergeSpec(True, "random", False, True),
    "dare_linear": MergeSpec(False, "random", False, True),
    "breadcrumbs": MergeSpec(False, "outliers", False, False),
    "breadcrumbs_ties": MergeSpec(True, "outliers", False, False),
    "della": MergeSpec(True, "della", True, True),
    "della_linear": MergeSpec(False, "della", False, True),
}
PER_MODEL = {None: ("weight",), "magnitude": ("weight", "density"), "random": ("weight", "density"),
             "outliers": ("weight", "density", "gamma"), "della": ("weight", "density", "epsilon")}
GLOBAL = ("normalize", "rescale", "lambda", "int8_mask", "consensus", "global_trim")


class TopK(Trim):
    """TIES's magnitude trim with mergekit's count: the int(density * n) largest |delta|."""

    def boundaries(self, n):
        return [n - int(self.params.density * n)]


class Outliers(Trim):
    """Breadcrumbs: drop the int(gamma * n) largest and the rest below the int(density * n)
    kept (mergekit 0.1.5: keep ranks [n_bot, n_bot + target))."""

    def __init__(self, density: float, gamma: float):
        super().__init__(density=density)
        self.gamma = gamma

    def boundaries(self, n):
        target = int(self.params.density * n)
        bottom = max(0, n - target - int(self.gamma * n))
        return [bottom, bottom + target]

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


class DellaPrune(LossyMethod):
    """DELLA's MagPrune: per row, keep probability (density - eps) + 2 eps * rank/(ncols - 1) of
    |delta| within the row (rank 0 the smallest; equal values ranked by position), drawn from the
    element RNG; kept entries rescaled to the tensor's L1 norm (mergekit's rescale) or not."""

    compact = False
    method_id = "della_prune"

    def __init__(self, density: float, epsilon: float, rescale: bool):
        self.density, self.epsilon, self.rescale = density, epsilon, rescale
        self.params = None

    def get_config(self):
        return {"id": self.method_id, "density": self.density, "epsilon": self.epsilon, "rescale": self.rescale}

    def keep(self, delta: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        cols = ctx.row_len
        if ctx.start % cols or delta.size % cols:
            raise ValueError(f"tensor '{ctx.tensor}': DELLA needs whole rows in a chunk")
        mag = np.abs(delta).reshape(-1, cols)
        if not np.isfinite(mag.max(initial=0.0)):  # ranks within a row: a NaN has none
            raise NonFinite("a NaN or infinite magnitude has no rank")
        ranks = np.empty(mag.shape, np.float64)
        order = np.argsort(mag, axis=1, kind="stable")
        np.put_along_axis(ranks, order, np.arange(cols, dtype=np.float64)[None, :], axis=1)
        prob = (self.density - self.epsilon) + ranks * (2 * self.epsilon / max(1, cols - 1))
        draws = uniform_u32(ctx.rng_key, ctx.start, ctx.stop).reshape(mag.shape)
        return (draws < np.minimum(np.round(prob * 2.0**32), 2.0**32 - 1)).reshape(-1)

    @property
    def has_post_stats(self):
        return self.rescale

    def post_stats(self, delta, ctx):
        return {"abs": magnitude_sum(delta), "abs_kept": magnitude_sum(delta, self.keep(delta, ctx))}

    def finalize_post(self, combined, state):
        return {**state, "factor": l1_factor(combined)}

    def edit_delta(self, delta, ctx):
        keep = self.keep(delta, ctx)
        delta *= np.float32(ctx.state.get("factor", 1.0))
        delta[~keep] = 0
        return delta


def sparsifier(kind: str | None, params: dict, rescale: bool) -> LossyMethod | None:
    """The per-(model, tensor) sparsifier, or None when it keeps everything (density >= 1)."""
    density = float(params.get("density", 1.0))
    if kind is None or density >= 1:
        return None
    if kind == "magnitude":
        return TopK(density=density) if density > 0 else TopK(density=1e-12)
    if kind == "random":
        return Dare(p=1 - density, rescale="l1" if rescale else "none")
    if kind == "outliers":
        return Outliers(density, float(params.get("gamma", 0.01)))
    return DellaPrune(density, float(params.get("epsilon", 0.15)), rescale)


def combine(base: np.ndarray, deltas: list[np.ndarray], weights: list[float], spec: MergeSpec, *,
            normalize: bool, lam: float, official: bool) -> np.ndarray:
    """base + lambda * merged delta (float32), from the sparsified deltas of one chunk slice."""
    w = [np.float32(x) for x in weights]
    mixed = np.zeros_like(base)
    if spec.consensus:
        terms = deltas if official else [wi * d for wi, d in zip(w, deltas)]
        elect = terms[0].copy()
        for x in terms[1:]:
            elect += x
        sign = kernels.select(elect >= 0, np.float32(1), np.float32(-1), np.empty_like(base))  # a sum of 0 elects +
        divisor = np.zeros_like(base)
        for x, wi in zip(terms, w):  # x where it agrees with the elected sign (a zero never does)
            kernels.consensus_add(x, sign, np.float32(1) if official else wi, mixed, divisor)
        if official or normalize:
            mixed /= _safe_divisor(divisor)
    else:
        for wi, d in zip(w, deltas):
            mixed += wi * d
        if normalize:
            mixed /= _safe_divisor(sum(w))
    mixed *= np.float32(lam)
    mixed += base
    return mixed


def linear(models: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    mixed = sum(np.float32(w) * m for w, m in zip(weights, models))
    return np.asarray(mixed / _safe_divisor(np.float32(sum(weights))) if normalize else mixed, np.float32)


def _safe_divisor(divisor):
    """The divisor (a float32 scalar, or an array changed in place) with |values| < 1e-8 set to 1."""
    if np.ndim(divisor):
        divisor[np.abs(divisor) < TINY_DIVISOR] = 1
        return divisor
    return divisor if abs(divisor) >= TINY_DIVISOR else np.float32(1)

