"""ternary (Ternary Weight Networks on the delta): check_method, and the formula written here
independently on whole tensors, in float64 and exact rationals where the method sums exactly."""

from fractions import Fraction

import numpy as np
import pytest

from deltastream.errors import ParameterError
from deltastream.methods import get_method

from common import tensor_f32
from method_check import SPECS, check_method

EDITED = [name for name, (_, shape) in SPECS.items() if len(shape) == 2]


def exact_mean(values: np.ndarray) -> float:
    """mean |x| of float32 values, each truncated to a multiple of 2^-56 (deltastream.exact's grid)."""
    return float(sum(int(abs(Fraction(float(x))) * 2**56) for x in values) / Fraction(2**56) / max(1, values.size))


def reference(delta: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    flat = delta.reshape(-1)
    cut = np.float32(threshold * exact_mean(flat))
    kept = np.abs(flat) > cut
    alpha = np.float32(scale * exact_mean(flat[kept])) if kept.any() else np.float32(0)
    return np.where(kept, np.where(flat > 0, alpha, -alpha), np.float32(0)).astype(np.float32).reshape(delta.shape)


@pytest.mark.parametrize("threshold,scale", [(0.7, 1.0), (1.5, 0.8)])
def test_ternary_equals_the_independent_reference(tmp_path, threshold, scale):
    from common import round_like

    method = get_method("ternary", threshold=threshold, scale=scale)
    check_method(method, str(tmp_path))
    base, ft, out = (str(tmp_path / name) for name in ("base", "ft", "edit"))
    for name in EDITED:
        d = tensor_f32(ft, name) - tensor_f32(base, name)
        expected = round_like(tensor_f32(base, name) + reference(d, threshold, scale), SPECS[name][0])
        got = tensor_f32(out, name)
        assert np.array_equal(got, expected), name
        assert np.unique(got - tensor_f32(base, name) != 0).size == 2  # some kept, some zeroed


def test_parameters_are_checked():
    for kw in ({"threshold": 0.0}, {"scale": -1.0}):
        with pytest.raises(ParameterError, match="out of range"):
            get_method("ternary", **kw)
