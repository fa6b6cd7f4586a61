"""Exact rank thresholds of magnitudes, found in streaming passes (a radix select on float bits).

TIES's trim keeps the k largest |delta|; multi-bit BitDelta cuts |delta| into 2^b equal-count
blocks. Both need "the element of rank r" of a tensor (or of a whole model) that arrives chunk by
chunk, in any order, and is never held whole. Magnitudes are nonnegative float32, so their uint32
bit patterns sort like their values; ranks are defined by (value, then global position: tensor
order, then flat index), so equal values are ordered by position and every rank is one element.

A boundary at rank r (0 <= r <= n) splits the elements into those of rank < r and the rest; it is
found exactly by a few passes, each a small per-chunk partial that adds up in any grouping:

1. ``histogram(bits)``: counts of the high 16 bits (65536 int64, 512 KiB).
   ``new_search`` + ``refine`` pick, per boundary, the bin holding rank r and the rank within it.
2. ``histogram(bits, search)``: counts of the next digit, only for elements in those bins, one row
   per distinct bin. The digits are (16, 16) while that is at most 8 rows (4 MiB); with more
   boundaries (16, 8, 8), one pass more but rows of 256 counts. After the last digit each
   boundary has its threshold value t (the value of the element of rank r) and ``below``, how
   many elements equal to t rank before r.
3. ``tie_partial``: per chunk, how many elements equal each threshold value, under a ``*_list``
   key with the chunk's id, so that ``tie_offsets`` gives each chunk the number of tied elements
   in earlier chunks (global position order = the order the records arrive in).

Then ``assign(bits, search, offsets)`` gives each element its block: block b holds the ranks in
[r_b, r_{b+1}) (r_0 = 0, r_{m+1} = n), so every block count is exact, whatever the chunking.

The per-element steps are numba kernels (``rank_kernels``), one pass over a chunk each with
branch-free searches over the few thresholds: real bf16 deltas, whose magnitudes mostly tie with
a threshold, cost no more than any others (numpy's gather, search and sort of the tied elements
took 80% of a TIES merge on them).

A NaN or infinite magnitude has no rank: the first histogram sees it in its top bins (bit
patterns from 0x7F800000) and raises ``exact.NonFinite``, at the cost of looking at 128 counts.
"""

from __future__ import annotations

import numpy as np

from . import kernels, rank_kernels
from .exact import NonFinite

__all__ = ["magnitude_bits", "digit_widths", "new_search", "histogram", "refine", "thresholds", "tie_values",
           "Cut", "classify", "tie_partial", "tie_record", "tie_offsets", "assign", "tied_blocks", "slices"]

FIRST = 16  # the first digit: a 65536-bin histogram of every element
_NON_FINITE_BIN = 0x7F80  # high 16 bits of the float32 infinity: it and every NaN bin at or above
SLICE = 1 << 20  # elements per step inside a chunk, for callers' temporaries (8 MiB of int64)
MAX_ROW_BYTES = 4 << 20  # refinement rows of 2^16 counts while they fit in this


def slices(n: int, step: int = SLICE):
    return ((s, min(n, s + step)) for s in range(0, n, step))


def magnitude_bits(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """|values| (float32) as uint32 bit patterns; ``out`` may be ``values`` itself (in place)."""
    return np.abs(values, out=out).view(np.uint32)


def digit_widths(boundaries: int) -> list[int]:
    """The digits of the search: (16, 16), or (16, 8, 8) when 2^16-count rows would be too many."""
    return [FIRST, 16] if boundaries * 8 << 16 <= MAX_ROW_BYTES else [FIRST, 8, 8]


def new_search(n: int, ranks: list[int], widths: list[int]) -> dict:
    """The search state (plain JSON) for boundaries at ``ranks`` among n elements; a rank equal
    to n is a boundary past the end (inactive: its value is None)."""
    ranks = [int(r) for r in ranks]
    if any(not 0 <= r <= n for r in ranks) or ranks != sorted(ranks):
        raise ValueError(f"ranks must be nondecreasing within [0, {n}], not {ranks}")
    return {"n": int(n), "ranks": ranks, "widths": list(widths), "level": 0,
            "prefix": [0 if r < n else None for r in ranks], "within": [r if r < n else None for r in ranks],
            "equal": [None] * len(ranks)}


def _rows(search: dict) -> list[int]:
    """The prefixes the next digit's histogram has a row for (level 0: one row, every element)."""
    return [0] if search["level"] == 0 else sorted({p for p in search["prefix"] if p is not None})


def histogram(bits: np.ndarray, search: dict | None = None) -> np.ndarray:
    """Pass partial: (rows, 2^width) int64 counts of the next digit of the elements whose higher
    digits match a boundary's prefix (level 0, or no search: the high 16 bits of all)."""
    if search is None or search["level"] == 0:
        hist = np.zeros((1, 1 << FIRST), np.int64)
        kernels.count_high(bits, hist[0])
        if hist[0, _NON_FINITE_BIN:].any():
            raise NonFinite("a NaN or infinite magnitude has no rank")
        return hist
    level, widths = search["level"], search["widths"]
    width = widths[level]
    shift_prev = 32 - sum(widths[:level])
    shift = shift_prev - width
    rows = np.array(_rows(search), np.uint32)
    hist = np.zeros((rows.size, 1 << width), np.int64)
    if rows.size == 0:
        return hist
    candidate = np.zeros(1 << FIRST, bool)  # high bins holding a row's prefix: skip the rest fast
    candidate[rows >> (32 - shift_prev - FIRST)] = True
    rank_kernels.digit_histogram(bits, candidate, rows, np.uint32(shift_prev), np.uint32(shift),
                                 np.uint32((1 << width) - 1), hist)
    return hist


def refine(search: dict, hist: np.ndarray) -> dict:
    """Fold the next digit's combined histogram into the search (a new dict)."""
    level, widths = search["level"], search["widths"]
    width, rows = widths[level], _rows(search)
    if hist.shape != (len(rows), 1 << width):
        raise ValueError(f"histogram of shape {hist.shape} for {len(rows)} rows of {1 << width}")
    cum = np.cumsum(hist, axis=1)
    row_of = {p: i for i, p in enumerate(rows)}
    prefix, within, equal = list(search["prefix"]), list(search["within"]), list(search["equal"])
    for j, p in enumerate(prefix):
        if p is None:
            continue
        i = row_of[p]
        if within[j] >= cum[i, -1]:
            raise ValueError("rank search: the passes saw different data (a rank beyond its bin)")
        digit = int(np.searchsorted(cum[i], within[j], side="right"))
        within[j] -= int(cum[i, digit - 1]) if digit else 0
        prefix[j] = (p << width) | digit
        if level + 1 == len(widths):
            equal[j] = int(hist[i, digit])
    return {**search, "level": level + 1, "prefix": prefix, "within": within, "equal": equal}


def thresholds(search: dict) -> tuple[np.ndarray, list[int]]:
    """(values of the active boundaries as uint32, nondecreasing; their ``below`` counts)."""
    if search["level"] != len(search["widths"]):
        raise ValueError("rank search not finished")
    active = [j for j, p in enumerate(search["prefix"]) if p is not None]
    return (np.array([search["prefix"][j] for j in active], np.uint32), [search["within"][j] for j in active])


def tie_values(search: dict) -> np.ndarray:
    """The distinct threshold values, sorted: the values whose ties need offsets."""
    return np.unique(thresholds(search)[0])


class Cut:
    """A finished search made fast to apply (``rank_kernels``): the thresholds t and their
    distinct ``values``; ``value_of[j]``, the index of t[j] in ``values``; ``first[v]:first[v + 1]``,
    the thresholds equal to values[v] (their ``below`` ascending, as their ranks)."""

    def __init__(self, search: dict):
        self.t, self.below = thresholds(search)
        self.values = np.unique(self.t)
        self.value_of = np.searchsorted(self.values, self.t).astype(np.intp)
        self.first = np.append(np.searchsorted(self.t, self.values, side="left"), self.t.size).astype(np.intp)


def classify(bits: np.ndarray, cut: Cut) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(how many thresholds are below each element; the positions of the elements equal to a
    threshold value, ascending; the index of that value in ``cut.values``)."""
    if cut.t.size == 0:
        return np.zeros(bits.size, np.intp), np.zeros(0, np.intp), np.zeros(0, np.intp)
    below = np.empty(bits.size, np.intp)
    tied = np.empty(bits.size, np.intp)
    which = np.empty(bits.size, np.intp)
    k = rank_kernels.classify_into(bits, cut.t, cut.value_of, below, tied, which)
    return below, tied[:k], which[:k]


def tie_partial(bits: np.ndarray, search: dict, chunk_id: tuple) -> dict:
    """Pass partial: this chunk's count of elements equal to each tie value, with its id."""
    cut = Cut(search)
    counts = np.zeros(cut.values.size, np.int64)
    rank_kernels.count_ties(bits, cut.values, counts)
    return tie_record(chunk_id, counts)


def tie_record(chunk_id: tuple, counts) -> dict:
    return {"ties_list": [(chunk_id, tuple(int(c) for c in counts))]}


def tie_offsets(search: dict, records: list) -> dict[str, np.ndarray]:
    """{tensor: (chunks, tie values) int64}: tied elements in all earlier chunks, per chunk.

    ``records`` are the ``ties_list`` of a tensor or a group, in global position order (the
    order ``combine_partials`` keeps); each tensor's chunks must come in a row, 0, 1, 2, ..."""
    values = tie_values(search)
    counts = np.array([c for _, c in records], np.int64).reshape(len(records), values.size)
    before = np.cumsum(counts, axis=0) - counts
    expected = {v: e for v, e in zip(search["prefix"], search["equal"]) if v is not None}
    if counts.sum(axis=0).tolist() != [expected[int(v)] for v in values]:
        raise ValueError("rank search: tie counts differ from the histograms (passes saw different data)")
    out: dict[str, np.ndarray] = {}
    start = 0
    for i in range(len(records) + 1):
        if i == len(records) or (i > start and records[i][0][0] != records[start][0][0]):
            tensor = records[start][0][0]
            if tensor in out or [cid[1] for cid, _ in records[start:i]] != list(range(i - start)):
                raise ValueError(f"rank search: chunks of tensor '{tensor}' out of order")
            out[tensor] = before[start:i]
            start = i
    return out


def assign(bits: np.ndarray, search: dict, offsets: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The block of each element of a chunk, given the chunk's row of ``tie_offsets``: the number
    of boundaries whose rank is <= the element's rank (uint8, or uint16 past 255 boundaries)."""
    cut = Cut(search)
    if out is None:
        out = np.empty(bits.size, np.uint8 if cut.t.size < 256 else np.uint16)
    if cut.t.size == 0:  # no active boundary: every element is in block 0
        out[:bits.size] = 0
        return out
    running = np.array(offsets, np.int64).reshape(cut.values.size)  # a copy: the kernel counts on in it
    rank_kernels.assign_blocks(bits, cut.t, cut.value_of, cut.first, np.array(cut.below, np.int64), running, out)
    return out


def tied_blocks(search: dict) -> list[tuple[int, int, int]]:
    """(value, block, count) of the elements equal to a threshold value, by block: what a block
    mean needs besides the sums of the untied elements."""
    t, below = thresholds(search)
    equal = {v: e for v, e in zip(search["prefix"], search["equal"]) if v is not None}
    out = []
    for value in tie_values(search):
        value = int(value)
        edges = [0] + [b for v, b in zip(t.tolist(), below) if v == value] + [equal[value]]
        first_block = int(np.searchsorted(t, value, side="left"))
        out += [(value, first_block + q, edges[q + 1] - edges[q]) for q in range(len(edges) - 1)
                if edges[q + 1] > edges[q]]
    return out
