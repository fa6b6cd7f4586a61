"""The merge sparsifiers: registered methods with their own ids and parameters (config is data).

Each sparsifies one model's delta of one tensor before the merge combines them; its random
stream is keyed by (seed, model as written in the config, tensor, element). ``SPARSIFIERS`` maps
a merge method's sparsification kind (``MergeSpec.sparsify``) to the method class, the per-model
parameters it reads and how it is built from them:

- ``magnitude`` -> :class:`TopK` (``ties_topk``): the int(density * n) largest |delta| (mergekit's
  count), per tensor or, with ``global_trim``, over the whole model (the official TIES trim);
- ``random`` -> deltastream's :class:`~deltastream.methods.dare.Dare` with p = 1 - density;
- ``outliers`` -> :class:`Outliers` (``breadcrumbs``);
- ``della`` -> :class:`DellaPrune` (``della_prune``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..exact import NonFinite, magnitude_sum
from ..methods.base import ChunkContext, LossyMethod, Method
from ..methods.dare import Dare, l1_factor
from ..methods.trim import GLOBAL_GROUP, Trim
from ..params import check_range, field
from ..rng import uniform_u32

__all__ = ["TopK", "Outliers", "DellaPrune", "SPARSIFIERS", "Sparsifier", "sparsifier", "model_group"]


def model_group(key: str) -> str:
    """The whole-model stats group of a merge job's key ``model NUL tensor``: one per model."""
    return f"{GLOBAL_GROUP}\x00{key.rpartition(chr(0))[0]}"


@dataclass(frozen=True)
class TopKParams:
    density: float = field(0.2, "fraction of entries kept: the int(density * n) largest |delta| (mergekit's count)")
    scope: str = field("tensor", "top-k per tensor (mergekit) or over the model's every trimmed tensor (global_trim)",
                       choices=("tensor", "global"))

    def __post_init__(self):
        check_range("ties_topk", "density", self.density, 0.0, 1.0)


class TopK(Trim):
    """TIES's magnitude trim with mergekit's count: the int(density * n) largest |delta|."""

    method_id = "ties_topk"
    Params = TopKParams
    summary = "TIES trim as mergekit counts it: keep the int(density * n) largest |delta| (merge only)"

    def stats_group(self, i, tensor):
        return model_group(tensor) if self.params.scope == "global" else tensor

    def boundaries(self, n):
        return [n - int(self.params.density * n)]


@dataclass(frozen=True)
class BreadcrumbsParams:
    density: float = field(0.9, "fraction of entries kept: the int(density * n) below the outliers")
    gamma: float = field(0.01, "fraction of the largest |delta| dropped as outliers: int(gamma * n)")

    def __post_init__(self):
        check_range("breadcrumbs", "density", self.density, 0.0, 1.0)
        check_range("breadcrumbs", "gamma", self.gamma, 0.0, 1.0)


class Outliers(Trim):
    """Breadcrumbs: drop the int(gamma * n) largest and the rest below the int(density * n)
    kept (mergekit 0.1.5: keep ranks [n_bot, n_bot + target))."""

    method_id = "breadcrumbs"
    Params = BreadcrumbsParams
    summary = "model breadcrumbs: drop the int(gamma n) largest |delta| and all but the next int(density n)"

    def stats_group(self, i, tensor):
        return tensor

    def boundaries(self, n):
        target = int(self.params.density * n)
        bottom = max(0, n - target - int(self.params.gamma * n))
        return [bottom, bottom + target]


@dataclass(frozen=True)
class DellaParams:
    density: float = field(0.7, "mean keep probability of an entry")
    epsilon: float = field(0.15, "half-width of the keep probabilities across a row's magnitude ranks")
    rescale: bool = field(True, "scale the kept entries so that the tensor keeps its L1 norm (mergekit's)")

    def __post_init__(self):
        check_range("della_prune", "density", self.density, 0.0, 1.0)
        check_range("della_prune", "epsilon", self.epsilon, 0.0, 1.0)


class DellaPrune(LossyMethod):
    """DELLA's MagPrune: per row, keep probability (density - eps) + 2 eps * rank/(ncols - 1) of
    |delta| within the row (rank 0 the smallest; equal values ranked by position), drawn from the
    element RNG; kept entries rescaled to the tensor's L1 norm (mergekit's rescale) or not."""

    compact = False
    method_id = "della_prune"
    Params = DellaParams
    summary = "DELLA MagPrune: keep by a probability rising with |delta|'s rank in its row (merge only)"

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
        p = self.params
        prob = (p.density - p.epsilon) + ranks * (2 * p.epsilon / max(1, cols - 1))
        draws = uniform_u32(ctx.rng_key, ctx.start, ctx.stop).reshape(mag.shape)
        return (draws < np.minimum(np.round(prob * 2.0**32), 2.0**32 - 1)).reshape(-1)

    @property
    def has_post_stats(self):
        return self.params.rescale

    def post_stats(self, delta, ctx):
        return {"abs": magnitude_sum(delta), "abs_kept": magnitude_sum(delta, self.keep(delta, ctx))}

    def finalize_post(self, combined, state):
        return {**state, "factor": l1_factor(combined)}

    def edit_delta(self, delta, ctx):
        keep = self.keep(delta, ctx)
        delta *= np.float32(ctx.state.get("factor", 1.0))
        delta[~keep] = 0
        return delta


@dataclass(frozen=True)
class Sparsifier:
    """A sparsification kind: its method, the per-model parameters it reads (besides weight),
    and its builder from (per-tensor values, rescale, trim scope)."""

    method: type[Method]
    parameters: tuple[str, ...]
    build: Callable[[dict, bool, str], LossyMethod]


def _density(values: dict) -> float:
    return float(values.get("density", 1.0))


SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": Sparsifier(TopK, ("density",), lambda v, rescale, scope: TopK(density=_density(v), scope=scope)),
    "random": Sparsifier(Dare, ("density",), lambda v, rescale, scope: Dare(
        p=1 - _density(v), rescale="l1" if rescale else "none")),
    "outliers": Sparsifier(Outliers, ("density", "gamma"), lambda v, rescale, scope: Outliers(
        density=_density(v), gamma=float(v.get("gamma", 0.01)))),
    "della": Sparsifier(DellaPrune, ("density", "epsilon"), lambda v, rescale, scope: DellaPrune(
        density=_density(v), epsilon=float(v.get("epsilon", 0.15)), rescale=rescale)),
}


def sparsifier(kind: str | None, values: dict, rescale: bool, scope: str = "tensor") -> LossyMethod | None:
    """The per-(model, tensor) sparsifier, or None when it keeps everything (density >= 1)."""
    if kind is None or _density(values) >= 1:
        return None
    return SPARSIFIERS[kind].build(values, rescale, scope)
