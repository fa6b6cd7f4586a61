"""The bank's CPU kernels (numba) on packed sign bits: a lookup-table product, a block decode and a fused switch.

:func:`sign_products` computes, for each token t of a mixed batch and the variant it runs,
``out[t, r] = sum_j alphas[j, r] * sum_c x[t, c] * s_j[r, c]`` with ``s_j = +1`` where bit c of
row r of plane j is set and ``-1`` where not, reading the packed bits directly (T-MAC /
bitnet.cpp style): per token it tabulates the 256 signed sums each group of 8 input features can
contribute (``cols / 8 * 256`` floats, in cache), then every packed byte of the weight is one
table lookup and one add, four rows at a time. One call serves every variant in the batch: the
planes of each are an entry of a numba typed list, so a patched layer costs one call however many
variants its batch mixes. The weight is read at 1 bit per element and never unpacked.

:func:`decode_signs` writes a block of rows as float32 ``sum_j +-alpha_j`` (the block product of
many tokens, and an embedding's rows), through a 256 x 8 table of signs.

:func:`sign_add_f32` and :func:`sign_add_bf16` are ``bank.use``'s switch for BitDelta: the
working copy ``round(f32(base) + (0 + sum_j +-alpha_j))`` in one pass, the arithmetic of BitDelta's
decode (``add_signed`` onto zeros, then ``output_bits``), so the switched weights are those
``apply`` writes, bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels import _as_f32, _round_bf16

__all__ = ["sign_products", "decode_signs", "unpack_signs", "sign_add_f32", "sign_add_bf16", "SIGNS", "UNIT_SIGNS"]

# serial kernels run on the bank's own threads (layers._split): numba's parallel loops beside
# torch's OpenMP threads ran 20-300x slower here (thread contention)
_pjit = numba.njit(nogil=True, cache=True, boundscheck=False)

#: SIGNS[b, k]: +1.0 where bit 7 - k of the byte b is set (np.packbits' order), else -1.0
SIGNS = np.where((np.arange(256)[:, None] >> (7 - np.arange(8))[None, :]) & 1, 1.0, -1.0).astype(np.float32)
#: SIGNS as the bit patterns of +-1.0 in bf16 and float16, eight to a byte as two uint64 words:
#: unpack_signs' tables
UNIT_SIGNS = {name: np.where(SIGNS > 0, one, one | 0x8000).astype(np.uint16).view(np.uint64)
              for name, one in (("bfloat16", 0x3F80), ("float16", 0x3C00))}


@_pjit
def _table(x, t, table):
    """table[g, b] = sum_k x[t, 8g + k] * (+1 if bit 7 - k of b else -1); columns past x's are 0."""
    cols = x.shape[1]
    for g in range(table.shape[0]):
        row = table[g]
        total = np.float32(0)
        for c in range(8 * g, min(cols, 8 * g + 8)):
            total += x[t, c]
        row[0] = -total
        for p in range(8):  # the entries with bit p set: those without it, plus twice its column's input
            c = 8 * g + 7 - p
            two = np.float32(2) * x[t, c] if c < cols else np.float32(0)
            step = 1 << p
            for b in range(step):
                row[step + b] = row[b] + two


@_pjit
def sign_products(x, tokens, which, planes, alphas, out, lo, hi, table):
    """out[t, lo:hi] = the sign product of x[t] with variant which[i]'s planes and alphas, for each
    t = tokens[i]; planes[v] uint8 [levels, rows, groups], alphas[v] float32 [levels, rows];
    table float32 [groups, 256] is scratch."""
    groups = table.shape[0]
    for i in range(tokens.shape[0]):
        t = tokens[i]
        _table(x, t, table)
        levels, scales = planes[which[i]], alphas[which[i]]
        for r in range(lo, hi):
            out[t, r] = 0
        for j in range(levels.shape[0]):
            plane, alpha = levels[j], scales[j]
            r = lo
            while r + 4 <= hi:  # four rows at once: four independent sums share each table row
                l0, l1, l2, l3 = plane[r], plane[r + 1], plane[r + 2], plane[r + 3]
                a0 = a1 = a2 = a3 = np.float32(0)
                for g in range(groups):
                    tg = table[g]
                    a0 += tg[l0[g]]
                    a1 += tg[l1[g]]
                    a2 += tg[l2[g]]
                    a3 += tg[l3[g]]
                out[t, r] += alpha[r] * a0
                out[t, r + 1] += alpha[r + 1] * a1
                out[t, r + 2] += alpha[r + 2] * a2
                out[t, r + 3] += alpha[r + 3] * a3
                r += 4
            for rest in range(r, hi):
                line = plane[rest]
                acc = np.float32(0)
                for g in range(groups):
                    acc += table[g, line[g]]
                out[t, rest] += alpha[rest] * acc


@_pjit
def _signed_row(planes, alphas, signs, r, edited):
    """edited[c] = 0 + sum_j +-alphas[j, r], level by level (each sum exact for one level)."""
    cols = edited.shape[0]
    full = cols // 8
    edited[:] = 0
    for j in range(planes.shape[0]):
        line, a = planes[j, r], alphas[j, r]
        for g in range(full):
            s = signs[line[g]]
            for k in range(8):
                edited[8 * g + k] += s[k] * a
        for c in range(8 * full, cols):
            edited[c] += signs[line[full], c - 8 * full] * a


@_pjit
def decode_signs(planes, alphas, signs, out):
    """out[r, c] = 0 + sum_j (+alphas[j, r] if bit c of planes[j, r] else -alphas[j, r])."""
    for r in range(out.shape[0]):
        _signed_row(planes, alphas, signs, r, out[r])


@_pjit
def unpack_signs(packed, table, out):
    """Rows of one plane as +-1 in a 16-bit float: out (uint64 [rows, cols / 4], the float bits
    four to a word) gets table[byte] (uint64 [256, 2]: eight elements) for each packed byte."""
    for r in range(packed.shape[0]):
        line, o = packed[r], out[r]
        for g in range(packed.shape[1]):
            s = table[line[g]]
            o[2 * g] = s[0]
            o[2 * g + 1] = s[1]


@_pjit
def sign_add_f32(weight, planes, alphas, signs, out):
    """out[r, c] = f32(weight[r, c]) + (0 + sum_j +-alphas[j, r]) by bit c of planes[j, r]."""
    rows, cols = weight.shape
    edited = np.empty(cols, np.float32)
    for r in range(rows):
        _signed_row(planes, alphas, signs, r, edited)
        for c in range(cols):
            out[r, c] = edited[c] + weight[r, c]


@_pjit
def sign_add_bf16(weight, planes, alphas, signs, out):
    """As sign_add_f32 on bf16 bit patterns (uint16), rounded to nearest even."""
    rows, cols = weight.shape
    edited = np.empty(cols, np.float32)
    for r in range(rows):
        _signed_row(planes, alphas, signs, r, edited)
        for c in range(cols):
            out[r, c] = _round_bf16(edited[c] + _as_f32(np.uint32(weight[r, c]) << np.uint32(16)))
