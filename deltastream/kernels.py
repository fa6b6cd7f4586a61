"""Fused CPU kernels (numba): one pass over a chunk where numpy needs five to ten.

numpy runs each step of a method (widen, subtract, hash, compare, compact, zigzag, split into
fixed-point parts, sum) as its own pass over a chunk-sized array; on 2 cores that made BitDelta
and DARE compress run at 1/10 to 1/15 of the speed of reading their inputs. These kernels do the
same arithmetic element by element in one pass, in cache, without the GIL, and give the same bits
as the numpy definitions they replace (tests/test_kernels.py checks each against them):

* :func:`split_sums`, :func:`row_split_sums`, :func:`block_split_sums` - the exact magnitude
  sums of deltastream.exact (of a chunk, of each row, of each block), in integer arithmetic on the
  float32 bit patterns;
* :func:`draws` - the element RNG (deltastream.rng);
* :func:`bf16_delta` - every lossy method's delta of a BF16 chunk, f32(ft) - f32(base);
* :func:`bf16_round`, :func:`bf16_add_round` - float32 to bf16, to nearest even (every lossy
  method's output: base + edited delta, rounded);
* :func:`select` - np.where of two float32 scalars (signs, multipliers);
* :func:`consensus_add` - one model's term of a TIES sign-consensus merge;
* :func:`count_high`, :func:`zero_outside_block`, :func:`block_split_sums` - the first-digit
  histogram of the exact rank passes (ranks.py; their other steps are rank_kernels.py), and
  multi-bit BitDelta's block steps.

A method's own kernels live next to it (methods/dare_kernels.py, methods/bitdelta_kernels.py)
and are registered as its "numba" implementations (methods/backends.py); the steps here, and the
bit casts and the RNG hash they build on, are shared.

Compiled on first use and cached on disk (``cache=True``), so only a new install pays the
compile (a few seconds).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = ["split_sums", "row_split_sums", "block_split_sums", "draws", "bf16_delta", "bf16_round",
           "bf16_add_round", "select", "consensus_add", "count_high",
           "zero_outside_block", "SEGMENT"]

_U32 = np.uint64(0xFFFFFFFF)
M1, M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers (deltastream.rng)
_M1 = np.uint64(M1)
_M2 = np.uint64(M2)
GRID_SHIFT = 94  # a float32 with biased exponent e is mantissa * 2^(max(e, 1) - 94) units of 2^-56
_LOW_BITS = 36  # low part: 2^-56 .. 2^-20 (deltastream.exact's LO_SHIFT - HI_SHIFT)
_LOW_MASK = (1 << _LOW_BITS) - 1
_BIG_EXPONENT = 143  # |x| >= 2^16: the high part could overflow

_jit = numba.njit(nogil=True, cache=True, boundscheck=False)


# --- bit casts and bit scans numba lacks for scalars (plain LLVM instructions) ---------------------
@intrinsic
def _as_f32(typingctx, bits):
    """The float32 whose bit pattern is the uint32 ``bits``."""
    return types.float32(types.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def _as_u32(typingctx, value):
    """The bit pattern of the float32 ``value``."""
    return types.uint32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def _ctz64(typingctx, word):
    """The number of trailing zero bits of a non-zero uint64."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.cttz", [i64], ir.FunctionType(i64, [i64, ir.IntType(1)]))
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])
    return types.uint64(types.uint64), codegen


@_jit
def _mix(x):
    """lowbias32 on a value held in uint64 (all arithmetic mod 2^32, as deltastream.rng)."""
    x ^= x >> np.uint64(16)
    x = (x * _M1) & _U32
    x ^= x >> np.uint64(15)
    x = (x * _M2) & _U32
    x ^= x >> np.uint64(16)
    return x


@_jit
def _draw(k0, k1, index):
    lo = np.uint64(index) & _U32
    hi = np.uint64(index) >> np.uint64(32)
    return _mix(_mix(lo ^ k0) ^ ((hi ^ k1) & _U32))


SEGMENT = 1 << 26  # elements per kernel call of a sum: int64 partials stay below 2^62


@_jit
def _parts(bits, weight):
    """|x| (float32 bit pattern) on the 2^-56 grid, truncated, as (high, low, big) int64 with
    |x| ~= high * 2^-20 + low * 2^-56 (deltastream.exact); big = 1 for |x| >= 2^16, inf or NaN,
    which the caller sums by the slow exact path. Times weight (0 or 1). Branch-free: vectorizes."""
    a = np.int64(bits & np.uint32(0x7FFFFFFF))
    e = a >> 23
    mant = ((a & 0x7FFFFF) | (np.int64(e > 0) << 23)) * weight
    s = max(e, 1) - GRID_SHIFT  # |x| = mant * 2^s grid units
    # every shift is clamped to the range that non-big values use (no shift past the word)
    high = ((mant >> min(max(_LOW_BITS - s, 0), 63))
            << min(max(s - _LOW_BITS, 0), _BIG_EXPONENT - GRID_SHIFT - _LOW_BITS - 1))
    low = ((mant << min(max(s, 0), _LOW_BITS)) >> min(max(-s, 0), 63)) & _LOW_MASK
    return high, low, np.int64(e >= _BIG_EXPONENT) * weight


@_jit
def split_sums(values_u32, mask, use_mask):
    """Sums of _parts over float32 bit patterns, where mask (if use_mask): (high, low, big)."""
    high = np.int64(0)
    low = np.int64(0)
    big = np.int64(0)
    for i in range(values_u32.size):
        h, lo, b = _parts(values_u32[i], np.int64(mask[i]) if use_mask else np.int64(1))
        high += h
        low += lo
        big += b
    return high, low, big


@_jit
def row_split_sums(rows_u32, high, low):
    """Per-row sums of _parts of a 2-D array of float32 bit patterns; returns the big count."""
    big = np.int64(0)
    for r in range(rows_u32.shape[0]):
        h_sum = np.int64(0)
        l_sum = np.int64(0)
        for i in range(rows_u32.shape[1]):
            h, lo, b = _parts(rows_u32[r, i], np.int64(1))
            h_sum += h
            l_sum += lo
            big += b
        high[r] = h_sum
        low[r] = l_sum
    return big


@_jit
def draws(k0, k1, start, out):
    """out[i] = the element RNG's draw of element start + i (deltastream.rng.uniform_u32)."""
    k0 = np.uint64(k0)
    k1 = np.uint64(k1)
    for i in range(out.size):
        out[i] = _draw(k0, k1, start + i)


@_jit
def bf16_delta(base, ft, delta):
    """delta = f32(ft) - f32(base) of a BF16 chunk (every lossy method's input), in one pass."""
    for i in range(ft.size):
        delta[i] = _as_f32(np.uint32(ft[i]) << np.uint32(16)) - _as_f32(np.uint32(base[i]) << np.uint32(16))


@_jit
def _round_bf16(value):
    """float32 -> bf16 bit pattern, to nearest even; a NaN stays a (quiet) NaN (dtypes.from_float32)."""
    bits = _as_u32(value)
    if value != value:
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@_jit
def bf16_round(values, out):
    """out = the bf16 bit patterns of float32 values, rounded to nearest even."""
    for i in range(values.size):
        out[i] = _round_bf16(values[i])


@_jit
def bf16_add_round(base, edited, out):
    """out = round_bf16(edited + f32(base)): a lossy method's output from its edited delta."""
    for i in range(edited.size):
        out[i] = _round_bf16(edited[i] + _as_f32(np.uint32(base[i]) << np.uint32(16)))


@_jit
def select(mask, if_true, if_false, out):
    """out = np.where(mask, if_true, if_false) for two float32 scalars (numpy's where of two
    scalars is several times slower on a random mask: benchmarks/micro.py)."""
    for i in range(mask.size):
        out[i] = if_true if mask[i] else if_false
    return out


# --- exact rank thresholds (deltastream.ranks): the per-element steps of its passes --------------
@_jit
def count_high(bits, hist):
    """hist[b >> 16] += 1 for every uint32 b (ranks' first-digit histogram)."""
    for i in range(bits.size):
        hist[bits[i] >> np.uint32(16)] += 1


@_jit
def zero_outside_block(delta, block, keep):
    """delta[i] = 0 where block[i] != keep (in place; numpy's ``delta[block != keep] = 0``)."""
    zero = np.float32(0)
    for i in range(delta.size):
        delta[i] = delta[i] if block[i] == keep else zero


@_jit
def block_split_sums(values_u32, key, high, low, big):
    """split_sums per block: element i adds to block key[i] (keys >= high.size are skipped).
    Up to 16 blocks, one masked pass per block, which vectorizes (a scatter into the block's
    accumulators waits on the previous element's add); more blocks scatter."""
    nb = high.size
    if nb <= 16:
        for k in range(nb):
            h_sum = np.int64(0)
            l_sum = np.int64(0)
            b_sum = np.int64(0)
            for i in range(values_u32.size):
                h, lo, b = _parts(values_u32[i], np.int64(key[i] == k))
                h_sum += h
                l_sum += lo
                b_sum += b
            high[k] += h_sum
            low[k] += l_sum
            big[k] += b_sum
        return
    for i in range(values_u32.size):
        k = key[i]
        if k < nb:
            h, lo, b = _parts(values_u32[i], np.int64(1))
            high[k] += h
            low[k] += lo
            big[k] += b


@_jit
def consensus_add(x, sign, weight, mixed, divisor):
    """One model's term of a TIES-style sign consensus, in place: where x agrees with the elected
    sign (x * sign > 0) mixed += x and divisor += weight, as the numpy steps
    ``prod = x * sign; agree = prod > 0; prod = maximum(prod, 0) * sign; mixed += prod;
    divisor += agree * weight`` (a NaN product propagates, as np.maximum does)."""
    zero = np.float32(0)
    for i in range(x.size):
        p = x[i] * sign[i]
        kept = p if (p > zero or p != p) else zero
        mixed[i] = mixed[i] + kept * sign[i]
        divisor[i] = divisor[i] + (weight if p > zero else zero)
