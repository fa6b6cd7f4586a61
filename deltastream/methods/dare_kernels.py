"""DARE's fused CPU kernels (numba), registered as its "numba" implementations (dare.py).

* :func:`keep_draws` - DARE's keep mask from the element RNG;
* :func:`dare_compact` - DARE's encode: the kept entries' zigzagged bit differences, compacted;
* :func:`dare_expand` - DARE's decode: the kept entries back in their places;
* :func:`dare_bf16_output` - DARE's whole apply or edit of a BF16 chunk, from the draws to the
  rounded output; :func:`dare_scale_kept` - DARE's edit of a float32 delta (other dtypes, merges).

Each gives the bits of the numpy definition it replaces (tests/test_kernels.py).
"""

from __future__ import annotations

import numpy as np

from ..kernels import _as_f32, _ctz64, _draw, _jit, _round_bf16

__all__ = ["keep_draws", "dare_compact", "dare_expand", "dare_bf16_output", "dare_scale_kept"]


@_jit
def _keep_word(k0, k1, start, count, t):
    """The keep decisions of elements start .. start + count - 1 (count <= 64) as bits of a word."""
    word = np.uint64(0)
    for b in range(count):
        word |= np.uint64(_draw(k0, k1, start + b) >= t) << np.uint64(b)
    return word


@_jit
def keep_draws(k0, k1, start, n, threshold, out):
    """out[i] = draw(start + i) >= threshold (DARE's keep mask); returns the kept count."""
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    t = np.uint64(threshold)
    kept = 0
    for i in range(n):
        keep = _draw(k0, k1, start + i) >= t
        out[i] = keep
        kept += keep
    return kept


@_jit
def dare_compact(base, ft, k0, k1, start, threshold, bits, out):
    """DARE encode: out[:kept] = zigzag(ft - base) of the kept elements, in order; returns kept.

    base and ft are unsigned bit patterns (uint8..uint64) of ``bits`` bits. The keep decisions
    of 64 elements go into one word whose set bits are then visited: no per-element branch to
    mispredict on a random mask, and no work on the dropped elements."""
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    t = np.uint64(threshold)
    width = np.uint64(bits)
    full = np.uint64(0xFFFFFFFFFFFFFFFF) >> (np.uint64(64) - width)
    top = width - np.uint64(1)
    kept = 0
    for s in range(0, ft.size, 64):
        word = _keep_word(k0, k1, start + s, min(ft.size - s, 64), t)
        while word:
            i = s + np.int64(_ctz64(word))
            word &= word - np.uint64(1)
            d = (np.uint64(ft[i]) - np.uint64(base[i])) & full
            out[kept] = ((d << np.uint64(1)) ^ (np.uint64(0) - (d >> top))) & full
            kept += 1
    return kept


@_jit
def dare_expand(kept_values, keep, out):
    """DARE decode: kept_values in order to the kept positions of out, zeros elsewhere (the stored
    chunk is padded: its tail is ignored). Returns the number of kept positions; when
    kept_values is shorter than that, nothing is written."""
    count = 0
    for i in range(keep.size):
        count += np.int64(keep[i])
    if count > kept_values.size:
        return count
    j = 0
    for i in range(keep.size):
        if keep[i]:
            out[i] = kept_values[j]
            j += 1
        else:
            out[i] = 0
    return count


@_jit
def _kept_bf16(base_bits, ft_bits, factor):
    """A kept element's output: round(((f32(ft) - f32(base)) * factor) + f32(base))."""
    b = _as_f32(np.uint32(base_bits) << np.uint32(16))
    return _round_bf16((_as_f32(np.uint32(ft_bits) << np.uint32(16)) - b) * factor + b)


@_jit
def dare_bf16_output(base, source, compact, k0, k1, start, threshold, factor, out):
    """DARE's output for a BF16 chunk (k = 0) in one pass: dropped elements give
    round(0 + f32(base)), kept ones round(delta * factor + f32(base)), as the numpy path.

    source is the fine-tune's bit patterns (edit), or with ``compact`` the stored kept entries,
    zigzagged, in order (apply; the chunk is padded). Returns the kept count; if it exceeds
    source.size nothing past the first shortfall is trusted (the caller raises)."""
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    t = np.uint64(threshold)
    zero = np.float32(0)
    for i in range(base.size):
        out[i] = _round_bf16(zero + _as_f32(np.uint32(base[i]) << np.uint32(16)))
    kept = 0
    for s in range(0, base.size, 64):
        word = _keep_word(k0, k1, start + s, min(base.size - s, 64), t)
        while word:
            i = s + np.int64(_ctz64(word))
            word &= word - np.uint64(1)
            if compact:
                if kept >= source.size:
                    return kept + 1
                z = np.uint32(source[kept])
                unzigzag = (z >> np.uint32(1)) ^ (np.uint32(0) - (z & np.uint32(1)))
                ft_bits = (np.uint32(base[i]) + unzigzag) & np.uint32(0xFFFF)
            else:
                ft_bits = np.uint32(source[i])
            out[i] = _kept_bf16(base[i], ft_bits, factor)
            kept += 1
    return kept


@_jit
def dare_scale_kept(delta, k0, k1, start, threshold, factor):
    """In place: delta[i] * factor where element start + i is kept, else 0 (DARE's edit of a
    float32 delta, as ``delta *= factor; delta[~keep] = 0``)."""
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    t = np.uint64(threshold)
    zero = np.float32(0)
    for i in range(delta.size):
        scaled = delta[i] * factor
        delta[i] = scaled if _draw(k0, k1, start + i) >= t else zero
