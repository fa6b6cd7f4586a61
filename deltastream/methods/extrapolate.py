"""Extrapolation (EXPO, Zheng et al.) and interpolation: ``W = W_POST + alpha * delta``.

``edited = (1 + alpha) * delta``: alpha > 0 moves past the fine-tune along its delta (EXPO),
alpha < 0 back toward the base (alpha = -1 gives the base). The paper (§6) shows the sign that
helps depends on the model and the data. Edit only (no compact form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..device import TORCH_DTYPES, edit_on_device
from ..params import check_range, field
from .backends import register
from .base import Edit

__all__ = ["Extrapolate"]


@dataclass(frozen=True)
class ExtrapolateParams:
    alpha: float = field(0.3, "W_POST + alpha * delta: > 0 extrapolates (EXPO), < 0 interpolates toward the base")

    def __post_init__(self):
        check_range("extrapolate", "alpha", self.alpha, -1.0, None)


class Extrapolate(Edit):
    method_id = "extrapolate"
    Params = ExtrapolateParams
    summary = "W_POST + alpha * delta: extrapolation (EXPO, alpha > 0) or interpolation (alpha < 0)"
    examples = ({"alpha": 0.4}, {"alpha": -0.5})

    def edit_delta(self, delta, ctx):
        with np.errstate(invalid="ignore"):  # alpha = -1 times an infinite delta: NaN, carried
            delta *= np.float32(1.0 + self.params.alpha)
        return delta


register(Extrapolate, "edit", "torch", TORCH_DTYPES)(
    lambda m, base, ft, ctx: edit_on_device(base, ft, ctx, ctx.device,
                                            lambda delta, ctx, dev: delta * float(np.float32(1.0 + m.params.alpha))))
