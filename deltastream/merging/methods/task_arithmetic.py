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
The sparsifiers (``merging.sparsifiers``) are registered methods, keyed per model so that each model's mask depends
only on (seed, model, tensor, element): adding a model or reordering tensors changes no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import kernels
from ..sparsifiers import SPARSIFIERS

__all__ = ["MergeSpec", "MERGE_METHODS", "PER_MODEL", "GLOBAL", "combine", "linear", "TINY_DIVISOR"]

TINY_DIVISOR = 1e-8  # a normalising divisor under this in magnitude becomes 1


@dataclass(frozen=True)
class MergeSpec:
    consensus: bool
    sparsify: str | None  # magnitude | random | della | outliers
    normalize: bool
    rescale: bool
    #: a weighted sum of the models themselves (no task vectors): the base is optional and, when
    #: listed among the models, one of them
    of_models: bool = False


#: mergekit's registry (merge_methods/registry.py): consensus, sparsification, defaults
MERGE_METHODS = {
    "linear": MergeSpec(False, None, True, False, of_models=True),
    "task_arithmetic": MergeSpec(False, None, False, False),
    "ties": MergeSpec(True, "magnitude", True, False),
    "dare_ties": MergeSpec(True, "random", False, True),
    "dare_linear": MergeSpec(False, "random", False, True),
    "breadcrumbs": MergeSpec(False, "outliers", False, False),
    "breadcrumbs_ties": MergeSpec(True, "outliers", False, False),
    "della": MergeSpec(True, "della", True, True),
    "della_linear": MergeSpec(False, "della", False, True),
}
#: the per-model parameters of each sparsification kind (weight, and what its sparsifier reads)
PER_MODEL: dict[str | None, tuple[str, ...]] = {
    None: ("weight",), **{kind: ("weight", *s.parameters) for kind, s in SPARSIFIERS.items()}}
GLOBAL = ("normalize", "rescale", "lambda", "int8_mask", "consensus", "global_trim")


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

