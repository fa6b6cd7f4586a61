"""The fused kernels give exactly the bits of the plain definitions they replace, written here
directly: numpy expressions, and exact rational arithmetic for the magnitude sums."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from deltastream import kernels
from deltastream.exact import magnitude_sum, row_magnitude_sums
from deltastream.methods import bitdelta_kernels, dare_kernels
from deltastream.methods.lossless import zigzag
from deltastream.rng import tensor_key, threshold_u32, uniform_u32

M1, M2 = 0x7FEB352D, 0x846CA68B


def reference_draws(key, start, n):
    """The element RNG as whole-array numpy (uint64 arithmetic, masked to 32 bits)."""
    index = np.arange(start, start + n, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)

    def mix(x):
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(M1)) & mask
        x = x ^ (x >> np.uint64(15))
        x = (x * np.uint64(M2)) & mask
        return x ^ (x >> np.uint64(16))

    h = mix((index & mask) ^ np.uint64(key[0]))
    return mix(h ^ (((index >> np.uint64(32)) ^ np.uint64(key[1])) & mask)).astype(np.uint32)


def reference_sum(values, mask=None):
    """sum of |x| truncated to multiples of 2^-56, in exact rationals."""
    chosen = values if mask is None else values[mask]
    return sum(int(abs(Fraction(float(x))) * 2**56) for x in chosen)


finite_f32 = arrays(np.float32, st.integers(0, 300),
                    elements=st.floats(-70000, 70000, width=32, allow_subnormal=True))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), start=st.integers(0, 2**40), n=st.integers(0, 700))
def test_draws_equal_the_numpy_hash(seed, start, n):
    key = tensor_key(seed, "w")
    assert np.array_equal(uniform_u32(key, start, start + n), reference_draws(key, start, n))


def test_draws_across_the_32_bit_index_boundary():
    key = tensor_key(3, "t")
    assert np.array_equal(uniform_u32(key, 2**32 - 100, 2**32 + 100), reference_draws(key, 2**32 - 100, 200))


@settings(max_examples=60, deadline=None)
@given(values=finite_f32, data=st.data())
def test_magnitude_sums_are_exact(values, data):
    mask = data.draw(arrays(bool, values.size))
    assert magnitude_sum(values) == reference_sum(values)
    assert magnitude_sum(values, mask) == reference_sum(values, mask)


def test_magnitude_sums_of_tiny_huge_and_special_values():
    values = np.array([0.0, -0.0, 1e-45, -1e-40, 2.0**-57, 3e-17, 1.5, 65535.9, 65536.0, 3e38], np.float32)
    assert magnitude_sum(values) == reference_sum(values)
    with pytest.raises(OverflowError):
        magnitude_sum(np.array([1.0, np.inf], np.float32))
    masked = np.array([1.0, np.nan, 2.0], np.float32)
    assert magnitude_sum(masked, np.array([True, False, True])) == 3 * 2**56


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), row_len=st.integers(1, 40), data=st.data())
def test_row_sums_are_exact(rows, row_len, data):
    values = data.draw(arrays(np.float32, rows * row_len, elements=st.floats(-1e5, 1e5, width=32)))
    assert row_magnitude_sums(values, row_len) == [reference_sum(r) for r in values.reshape(rows, row_len)]


def widen(bf16):
    return (bf16.astype(np.uint32) << 16).view(np.float32)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 100), data=st.data())
def test_bf16_delta_and_signs_equal_the_numpy_delta_and_packbits(n, data):
    base = data.draw(arrays(np.uint16, n))  # every bf16 pattern: zeros, subnormals, inf, NaN
    ft = data.draw(arrays(np.uint16, n))
    with np.errstate(invalid="ignore", over="ignore"):
        expected = widen(ft) - widen(base)
    delta = np.empty(n, np.float32)
    packed = np.empty((n + 7) // 8, np.uint8)
    bitdelta_kernels.bf16_delta_signs(base, ft, delta, packed)
    assert np.array_equal(delta.view(np.uint32), expected.view(np.uint32))
    plain = np.empty(n, np.float32)
    kernels.bf16_delta(base, ft, plain)
    assert np.array_equal(plain.view(np.uint32), expected.view(np.uint32))
    with np.errstate(invalid="ignore"):
        assert np.array_equal(packed, np.packbits(expected >= 0))


def test_bitdelta_encode_of_typical_deltas():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(10_001).astype(np.float32) * 0.02
    base = (w.view(np.uint32) >> 16).astype(np.uint16)
    ft = ((w + rng.standard_normal(w.size).astype(np.float32) * 1e-3).view(np.uint32) >> 16).astype(np.uint16)
    delta = np.empty(w.size, np.float32)
    packed = np.empty(1251, np.uint8)
    bitdelta_kernels.bf16_delta_signs(base, ft, delta, packed)
    assert np.array_equal(packed, np.packbits(widen(ft) - widen(base) >= 0))
    assert magnitude_sum(delta) == reference_sum(widen(ft) - widen(base))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 0.999])
def test_dare_compact_and_expand_equal_the_masked_reference(dtype, p):
    rng = np.random.default_rng(1)
    n, start = 5003, 2**32 - 2000  # the chunk crosses the RNG's 32-bit index boundary
    info = np.iinfo(dtype)
    base = rng.integers(0, info.max, n, dtype=dtype, endpoint=True)
    ft = rng.integers(0, info.max, n, dtype=dtype, endpoint=True)
    key = tensor_key(9, "layers.0.w")
    threshold = min(threshold_u32(p), 2**32 - 1)
    keep = reference_draws(key, start, n) >= threshold

    out = np.empty(n, dtype)
    kept = dare_kernels.dare_compact(base, ft, *key, start, threshold, info.bits, out)
    assert np.array_equal(out[:kept], zigzag(ft - base)[keep])

    mask = np.empty(n, bool)
    assert dare_kernels.keep_draws(*key, start, n, threshold, mask) == keep.sum()
    assert np.array_equal(mask, keep)

    padded = np.concatenate([out[:kept], np.full(7, 99, dtype)])  # a stored chunk is padded
    back = np.full(n, 5, dtype)
    assert dare_kernels.dare_expand(padded, keep, back) == kept
    assert np.array_equal(back, np.where(keep, zigzag(ft - base), 0))
    if kept:  # too few stored entries: reported, nothing written
        untouched = np.full(n, 5, dtype)
        assert dare_kernels.dare_expand(out[: kept - 1], keep, untouched) == kept
        assert (untouched == 5).all()


def same_bf16(a, b):
    """Equal bf16 patterns, where a NaN equals any NaN: which payload NaN + NaN keeps is the
    compiler's and the CPU's choice (IEEE 754 leaves it open), not a rounding difference."""
    nan = lambda x: (x & 0x7F80 == 0x7F80) & (x & 0x7F != 0)  # noqa: E731
    return np.array_equal(np.where(nan(a) & nan(b), 0, a), np.where(nan(a) & nan(b), 0, b))


def reference_bf16(values):
    """float32 -> bf16 to nearest even, in numpy; a NaN keeps its sign and payload top, made quiet."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), (bits >> 16).astype(np.uint16) | 0x40, rounded)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(0, 200))
def test_bf16_rounding_and_the_fused_output(data, n):
    values = data.draw(arrays(np.uint32, n)).view(np.float32)  # every float32, NaNs and infinities too
    base = data.draw(arrays(np.uint16, n))
    out = np.empty(n, np.uint16)
    kernels.bf16_round(values, out)
    assert np.array_equal(out, reference_bf16(values))
    with np.errstate(invalid="ignore", over="ignore"):
        expected = reference_bf16(values + widen(base))
    kernels.bf16_add_round(base, values, out)
    assert same_bf16(out, expected)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(2).integers(0, 2**32, 100_000, dtype=np.uint32).view(np.float32)
    out = np.empty(values.size, np.uint16)
    kernels.bf16_round(values, out)
    ours = out[~np.isnan(values)]
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)[~np.isnan(values)]
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("per_element", [False, True])
def test_add_signed_equals_alpha_times_sign(per_element):
    rng = np.random.default_rng(4)
    n = 1001
    packed = rng.integers(0, 256, (n + 7) // 8, dtype=np.uint8)
    alpha = rng.random(n).astype(np.float32) if per_element else np.array([0.0], np.float32)
    start = rng.standard_normal(n).astype(np.float32)
    edited = start.copy()
    bitdelta_kernels.add_signed(packed, alpha, per_element, edited)
    sign = np.where(np.unpackbits(packed, count=n).astype(bool), np.float32(1), np.float32(-1))
    expected = start + (alpha if per_element else alpha[0]) * sign
    assert np.array_equal(edited.view(np.uint32), expected.view(np.uint32))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(0, 300), p=st.sampled_from([0.0, 0.5, 0.9]),
       factor=st.floats(0.5, 20, width=32))
def test_dare_bf16_output_equals_the_numpy_formula(data, n, p, factor):
    base = data.draw(arrays(np.uint16, n))  # any bf16, specials included
    ft = data.draw(arrays(np.uint16, n))
    key, start = tensor_key(1, "w"), 2**32 - 150
    threshold = min(threshold_u32(p), 2**32 - 1)
    keep = reference_draws(key, start, n) >= threshold
    factor = np.float32(factor)
    with np.errstate(invalid="ignore", over="ignore"):
        edited = np.where(keep, (widen(ft) - widen(base)) * factor, np.float32(0))
        expected = reference_bf16(edited + widen(base))
    out = np.empty(n, np.uint16)
    assert dare_kernels.dare_bf16_output(base, ft, False, *key, start, threshold, factor, out) == keep.sum()
    assert same_bf16(out, expected)
    stored = np.concatenate([zigzag(ft - base)[keep], np.zeros(3, np.uint16)])  # padded, as stored
    out[:] = 0
    assert dare_kernels.dare_bf16_output(base, stored, True, *key, start, threshold, factor, out) == keep.sum()
    assert same_bf16(out, expected)
    if keep.sum():  # fewer entries stored than the seed keeps: reported
        assert dare_kernels.dare_bf16_output(base, stored[: keep.sum() - 1], True, *key, start, threshold,
                                        factor, out) > keep.sum() - 1


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(0, 100), alpha=st.floats(0, 1, width=32))
def test_bitdelta_bf16_output_equals_add_signed_then_rounding(data, n, alpha):
    base = data.draw(arrays(np.uint16, n))
    packed = data.draw(arrays(np.uint8, (n + 7) // 8))
    edited = np.zeros(n, np.float32)
    bitdelta_kernels.add_signed(packed, np.array([alpha], np.float32), False, edited)
    expected = np.empty(n, np.uint16)
    kernels.bf16_add_round(base, edited, expected)
    out = np.empty(n, np.uint16)
    bitdelta_kernels.bitdelta_bf16_output(base, packed, np.float32(alpha), out)
    assert np.array_equal(out, expected)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(0, 300), p=st.sampled_from([0.0, 0.5, 0.9]), factor=st.floats(0, 20, width=32))
def test_dare_scale_kept_equals_scale_then_zero(data, n, p, factor):
    delta = data.draw(arrays(np.uint32, n)).view(np.float32)  # any float32
    key, start = tensor_key(4, "w"), 2**32 - 100
    threshold = min(threshold_u32(p), 2**32 - 1)
    keep = reference_draws(key, start, n) >= threshold
    with np.errstate(invalid="ignore", over="ignore"):
        expected = delta * np.float32(factor)
    expected[~keep] = 0
    out = delta.copy()
    with np.errstate(invalid="ignore", over="ignore"):
        dare_kernels.dare_scale_kept(out, *key, start, threshold, np.float32(factor))
    assert same_bf16(out.view(np.uint32) >> 16, expected.view(np.uint32) >> 16)
    assert np.array_equal(out.view(np.uint32)[~np.isnan(out)], expected.view(np.uint32)[~np.isnan(expected)])


def test_select_equals_numpy_where():
    mask = np.random.default_rng(5).random(1001) < 0.4
    for a, b in [(1.0, -1.0), (0.0, -0.0), (np.nan, np.inf), (3.5e-40, -2.0)]:
        out = kernels.select(mask, np.float32(a), np.float32(b), np.empty(mask.size, np.float32))
        assert np.array_equal(out.view(np.uint32), np.where(mask, np.float32(a), np.float32(b)).view(np.uint32))


def test_rank_steps_equal_their_numpy_forms():
    rng = np.random.default_rng(6)
    bits = rng.integers(0, 2**32, 5000, dtype=np.uint32)
    bits[:50] = bits[50]  # ties
    hist = np.zeros(1 << 16, np.int64)
    kernels.count_high(bits, hist)
    assert np.array_equal(hist, np.bincount(bits >> 16, minlength=1 << 16))

    delta = rng.standard_normal(bits.size).astype(np.float32)
    block = rng.integers(0, 3, bits.size).astype(np.uint8)
    expected = delta.copy()
    expected[block != 1] = 0
    kernels.zero_outside_block(delta, block, 1)
    assert np.array_equal(delta.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("blocks", [1, 4, 16, 40])
def test_block_sums_equal_per_block_exact_sums(blocks):
    rng = np.random.default_rng(blocks)
    values = (rng.standard_normal(3001) * 1e-3).astype(np.float32)
    key = rng.integers(0, blocks + 1, values.size).astype(np.uint16)  # key == blocks: skipped
    high, low, big = (np.zeros(blocks, np.int64) for _ in range(3))
    kernels.block_split_sums(values.view(np.uint32), key, high, low, big)
    assert not big.any()
    assert [(int(h) << 36) + int(lo) for h, lo in zip(high, low)] == [reference_sum(values[key == b])
                                                                      for b in range(blocks)]


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(0, 200), weight=st.floats(-2, 2, width=32))
def test_consensus_add_equals_the_numpy_steps(data, n, weight):
    any_f32 = arrays(np.uint32, n)
    x, mixed, divisor = (data.draw(any_f32).view(np.float32) for _ in range(3))
    sign = np.where(data.draw(arrays(bool, n)), np.float32(1), np.float32(-1))
    w = np.float32(weight)
    with np.errstate(invalid="ignore", over="ignore"):
        prod = x * sign
        agree = prod > 0
        prod = np.maximum(prod, 0) * sign
        expected_mixed = mixed + prod
        expected_divisor = divisor + agree * w
        got_mixed, got_divisor = mixed.copy(), divisor.copy()
        kernels.consensus_add(x, sign, w, got_mixed, got_divisor)
    for got, expected in ((got_mixed, expected_mixed), (got_divisor, expected_divisor)):
        nan = np.isnan(got) & np.isnan(expected)  # which NaN payload survives is the hardware's
        assert np.array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])
        assert np.array_equal(np.isnan(got), np.isnan(expected))


def test_every_registered_fast_path_is_checked_against_numpy():
    """The kernels list is the registry's (methods/backends.py): every registered numba and torch
    implementation is reached by a parameter set of test_check_method, which compares its bytes
    with the numpy reference's."""
    from test_check_method import CASES

    from deltastream.methods import backends, get_method

    registered = {(i.method, i.role, i.backend) for i in backends.implementations()}
    reached = set()
    for name, params in CASES:
        method = get_method(name, **params)
        reached |= {(cls, role, backend) for cls, role, backend in registered
                    if cls is type(method) and method.implements(role, backend)}
    assert reached == registered and {b for _, _, b in registered} == {"numba", "torch"}
