"""The element RNG: a pure function of (seed, name, index), the same on numpy and torch."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltastream.rng import tensor_key, threshold_u32, uniform_u32, uniform_u32_torch


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), start=st.integers(0, 2**40), n=st.integers(0, 3000))
def test_numpy_and_torch_give_the_same_bits(seed, start, n):
    key = tensor_key(seed, "model.layers.0.mlp.up_proj.weight")
    assert np.array_equal(uniform_u32(key, start, start + n),
                          uniform_u32_torch(key, start, start + n).numpy().astype(np.uint32))


def test_crossing_the_32_bit_index_boundary():
    key = tensor_key(0, "w")
    whole = uniform_u32(key, 2**32 - 10, 2**32 + 10)
    assert np.array_equal(whole[:10], uniform_u32(key, 2**32 - 10, 2**32))
    assert np.array_equal(whole[10:], uniform_u32(key, 2**32, 2**32 + 10))


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(1, 9999), max_size=6))
def test_draws_do_not_depend_on_how_the_range_is_cut(cuts):
    key = tensor_key(7, "t")
    bounds = [0, *sorted(set(cuts)), 10000]
    pieces = [uniform_u32(key, a, b) for a, b in zip(bounds, bounds[1:])]
    assert np.array_equal(np.concatenate(pieces), uniform_u32(key, 0, 10000))


def test_keys_differ_by_seed_and_name():
    assert len({tensor_key(s, n) for s in (0, 1) for n in ("a", "b", "a.weight")}) == 6
    assert not np.array_equal(uniform_u32(tensor_key(0, "a"), 0, 64), uniform_u32(tensor_key(1, "a"), 0, 64))


def test_statistics_of_four_million_draws():
    n = 1 << 22
    u = uniform_u32(tensor_key(0, "stats"), 0, n).astype(np.float64) / 2**32
    assert abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / n)  # mean within 6 sigma
    counts = np.bincount((u * 256).astype(int), minlength=256)
    chi2 = (((counts - n / 256) ** 2) / (n / 256)).sum()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)  # 255 dof: within 6 sigma of the mean
    d = np.abs(np.sort(u) - (np.arange(n) + 0.5) / n).max()  # Kolmogorov-Smirnov statistic
    assert d < 1.95 / math.sqrt(n)  # p > 0.001
    # adjacent indices are not correlated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 6 / math.sqrt(n)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_threshold_gives_the_drop_rate(p):
    n = 1 << 20
    dropped = (uniform_u32(tensor_key(3, "m"), 0, n) < threshold_u32(p)).mean()
    assert abs(dropped - p) < 6 * math.sqrt(p * (1 - p) / n) + 1e-12
