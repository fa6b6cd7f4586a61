"""Numba kernels of the exact rank passes (deltastream.ranks): one pass per chunk, no search arrays.

On bf16 fine-tunes |delta| takes a few values per exponent, so most elements of a chunk fall in
the high-16-bit bin of a threshold and many equal it. The numpy steps (gather those elements,
``searchsorted`` them, ``argsort`` the tied ones by value, ``searchsorted`` their ranks) then ran
over most of each chunk with int64 temporaries and took 80% of a TIES merge. These kernels do the
same per element in one pass, in order, with branch-free binary searches over the few thresholds:

* :func:`digit_histogram` - the counts of the next digit of the elements matching a prefix;
* :func:`classify_into` - per element, the thresholds below it; the positions tied with one;
* :func:`count_ties` - per chunk, the elements equal to each threshold value;
* :func:`assign_blocks` - each element's block, tied ones by their running place among equals.

``tests/test_ranks.py`` checks them against a dense stable sort by (|delta|, position).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["digit_histogram", "classify_into", "count_ties", "assign_blocks"]

_jit = numba.njit(nogil=True, cache=True, boundscheck=False)
_HIGH = np.uint32(16)  # the first digit's shift: bins of the high 16 bits
_BLOCK = 4096  # elements gathered at a time by digit_histogram (16 KiB, in L1)


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _count_below(t, b):
    """How many of the sorted, nonempty t are < b (``np.searchsorted(t, b, side="left")``).
    Branch-free: a fixed number of halvings, each a conditional move (a tie-heavy chunk makes a
    search's branches unpredictable; with one threshold it is one compare and vectorizes)."""
    base = 0
    n = t.size
    while n > 1:
        half = n >> 1
        base = base + half if t[base + half] < b else base
        n -= half
    return base + np.int64(t[base] < b)


@_jit
def digit_histogram(bits, candidate, rows, shift_prev, shift, mask, hist):
    """hist[row, (b >> shift) & mask] += 1 for each b whose prefix ``b >> shift_prev`` is
    rows[row] (rows sorted, nonempty; ``candidate`` flags the high bins holding a row's prefix).
    Gathering the candidates first, branch-free, is twice as fast when a random fifth of the
    elements are candidates (a tie-heavy threshold bin)."""
    last = rows.size - 1
    picked = np.empty(_BLOCK, np.uint32)  # a block's candidates, gathered without a branch
    for s in range(0, bits.size, _BLOCK):
        k = 0
        for i in range(s, min(bits.size, s + _BLOCK)):
            b = bits[i]
            picked[k] = b
            k += np.int64(candidate[b >> _HIGH])
        for q in range(k):
            b = picked[q]
            prefix = b >> shift_prev
            r = min(_count_below(rows, prefix), last)
            if rows[r] == prefix:
                hist[r, (b >> shift) & mask] += 1


@_jit
def _bins(t):
    """Per high-16-bit bin: how many thresholds (t sorted) lie in lower bins, and whether one lies
    in it. An element in a bin without one needs no search and ties with nothing: most elements,
    unless the chunk is tie-heavy."""
    lower = np.zeros((1 << 16) + 1, np.int64)
    inside = np.zeros(1 << 16, np.bool_)
    for j in range(t.size):
        h = t[j] >> _HIGH
        inside[h] = True
        lower[h + 1] += 1
    for h in range(1 << 16):
        lower[h + 1] += lower[h]
    return lower, inside


@_jit
def _mostly_outside(bits, inside):
    """Whether under an eighth of the chunk's first 4096 elements lie in a threshold's bin: then a
    branch that skips the search is predictable and pays; in a tie-heavy chunk it is not, and
    the branch-free search over every element wins."""
    n = min(bits.size, 4096)
    c = 0
    for i in range(n):
        c += np.int64(inside[bits[i] >> _HIGH])
    return c * 8 < n


@_jit
def classify_into(bits, t, value_of, below, tied, which):
    """below[i] = the thresholds (t sorted, nonempty) < element i; tied[:k] = the positions equal
    to a threshold, in order, and which[:k] = that value's index (``value_of[j]``: the index of
    t[j] among the distinct values); returns k."""
    last = t.size - 1
    lower, inside = _bins(t)
    skip = _mostly_outside(bits, inside)
    k = 0
    for i in range(bits.size):
        b = bits[i]
        if skip and not inside[b >> _HIGH]:
            below[i] = lower[b >> _HIGH]
            continue
        j = _count_below(t, b)
        below[i] = j
        j = min(j, last)
        tied[k] = i
        which[k] = value_of[j]
        k += np.int64(t[j] == b)
    return k


@_jit
def count_ties(bits, values, counts):
    """counts[v] += the elements equal to values[v] (sorted, distinct): a chunk's tie partial.
    Up to 16 values, one counting pass each, which vectorizes; more, a search per element."""
    if values.size <= 16:
        for v in range(values.size):
            c = np.int64(0)
            x = values[v]
            for i in range(bits.size):
                c += np.int64(bits[i] == x)
            counts[v] += c
        return
    last = values.size - 1
    for i in range(bits.size):
        b = bits[i]
        v = min(_count_below(values, b), last)
        counts[v] += np.int64(values[v] == b)


@_jit
def _assign_one_value(bits, t, end, ranks_below, place, out):
    """assign_blocks when every threshold has one value t[0] (first = [0, end]); returns the
    running place. Three times faster: no per-element load and store of the value's state."""
    x = t[0]
    p = 0
    for i in range(bits.size):
        b = bits[i]
        is_tie = np.int64(b == x)
        while p < end and ranks_below[p] <= place:
            p += 1
        out[i] = _count_below(t, b) + is_tie * p
        place += is_tie
    return place


@_jit
def assign_blocks(bits, t, value_of, first, ranks_below, running, out):
    """out[i] = the boundaries at or below element i's rank (t sorted, nonempty). An element equal
    to value v is the running[v]-th of its ties (running counts on, in place), and passes the
    boundaries at v whose ``ranks_below[first[v]:first[v + 1]]`` (ascending: how many of v's ties
    rank below the boundary) are <= its place: a pointer per value walks them as running grows."""
    if first.size == 2:  # one distinct value (trim's one threshold): its state in registers
        running[0] = _assign_one_value(bits, t, first[1], ranks_below, running[0], out)
        return
    done = first[:-1].copy()  # per value: the first of its boundaries not yet passed
    last = t.size - 1
    lower, inside = _bins(t)
    skip = _mostly_outside(bits, inside)
    for i in range(bits.size):
        b = bits[i]
        if skip and not inside[b >> _HIGH]:  # no threshold in its bin: no search, no tie
            out[i] = lower[b >> _HIGH]
            continue
        j = _count_below(t, b)
        jc = min(j, last)
        is_tie = np.int64(t[jc] == b)
        v = value_of[jc]
        place = running[v]  # the place of v's next tie; walking to it is right whether b ties or not
        p = done[v]
        while p < first[v + 1] and ranks_below[p] <= place:
            p += 1
        done[v] = p
        out[i] = j + is_tie * (p - first[v])
        running[v] = place + is_tie
