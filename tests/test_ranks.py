"""Streaming rank thresholds (deltastream.ranks) equal a dense stable argsort, ties broken by
position, for any chunking, digit split and tree of folds; heavy ties split exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltastream import ranks
from deltastream.methods.base import combine_partials


def tree_fold(parts, fan_in=3):
    """Fold partials in order, in a tree like the engine's (associativity is part of the contract)."""
    while len(parts) > 1:
        parts = [_fold(parts[i:i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _fold(group):
    out = None
    for p in group:
        out = combine_partials(out, p)
    return out


def streamed(tensors, rank_fn, widths, chunk):
    """Run the passes over {name: float32 values} (in order) cut into chunks; return the search
    and each tensor's blocks."""
    chunks = [(name, i, v[s:s + chunk]) for name, v in tensors.items()
              for i, s in enumerate(range(0, max(1, v.size), chunk))]
    bits = lambda c: ranks.magnitude_bits(c.copy())
    search = None
    for level in range(len(widths)):
        hist = tree_fold([{"hist": ranks.histogram(bits(c), search)} for _, _, c in chunks])["hist"]
        if level == 0:
            n = int(hist.sum())
            search = ranks.new_search(n, rank_fn(n), widths)
        search = ranks.refine(search, hist)
    records = tree_fold([ranks.tie_partial(bits(c), search, (name, i)) for name, i, c in chunks])["ties_list"]
    offsets = ranks.tie_offsets(search, records)
    blocks = {name: [] for name in tensors}
    for name, i, c in chunks:
        blocks[name].append(ranks.assign(bits(c), search, offsets[name][i]))
    return search, {name: np.concatenate(b) for name, b in blocks.items()}


def dense(values, boundaries):
    """Reference: the rank of each element (stable argsort: ties by position), its block, and
    each boundary's (value, how many of its ties rank below it)."""
    bits = np.abs(values).view(np.uint32)
    order = np.argsort(bits, kind="stable")
    rank = np.empty(bits.size, np.int64)
    rank[order] = np.arange(bits.size)
    block = np.searchsorted(np.array(boundaries, np.int64), rank, side="right")
    sorted_bits = bits[order]
    found = [(int(sorted_bits[r]), r - int((bits < sorted_bits[r]).sum())) for r in boundaries if r < bits.size]
    return block, found


def equal_blocks(m):
    return lambda n: [b * n // (m + 1) for b in range(1, m + 1)]


def heavy_ties(rng, n, zeros=0.6):
    """Gaussian magnitudes with many exact zeros (spanning several boundaries) and a repeated value."""
    v = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    v[rng.random(n) < zeros] = 0
    v[rng.random(n) < 0.1] = np.float32(-1e-3)  # ties of a nonzero magnitude, either sign
    return v


CASES = [(m, chunk) for m in (1, 3, 7, 15, 31) for chunk in (29, 1000, 10**6)] + [(31, 3), (1, 5)]


@pytest.mark.parametrize("m,chunk", CASES)
def test_blocks_and_thresholds_equal_the_dense_reference(m, chunk):
    rng = np.random.default_rng(m)
    tensors = {"a": heavy_ties(rng, 700), "b": heavy_ties(rng, 333, zeros=0.3), "c": heavy_ties(rng, 5)}
    search, got = streamed(tensors, equal_blocks(m), ranks.digit_widths(m), chunk)
    whole = np.concatenate(list(tensors.values()))
    block, found = dense(whole, equal_blocks(m)(whole.size))
    assert np.array_equal(np.concatenate([got[k] for k in tensors]), block)
    values, below = ranks.thresholds(search)
    assert list(zip(values.tolist(), below)) == found
    assert np.bincount(block, minlength=m + 1).tolist() == np.diff([0, *equal_blocks(m)(whole.size), whole.size]).tolist()


def test_both_digit_splits_agree():
    rng = np.random.default_rng(1)
    tensors = {"w": heavy_ties(rng, 2000)}
    fn = equal_blocks(7)
    assert ranks.digit_widths(7) == [16, 16] and ranks.digit_widths(15) == [16, 8, 8]
    s1, b1 = streamed(tensors, fn, [16, 16], 77)
    s2, b2 = streamed(tensors, fn, [16, 8, 8], 77)
    assert np.array_equal(b1["w"], b2["w"])
    assert ranks.thresholds(s1)[0].tolist() == ranks.thresholds(s2)[0].tolist()


@pytest.mark.parametrize("rank_fn", [lambda n: [0], lambda n: [n], lambda n: [0, 0, n, n], lambda n: [n // 2] * 3])
def test_boundaries_at_the_ends_and_repeated(rank_fn):
    rng = np.random.default_rng(2)
    tensors = {"w": heavy_ties(rng, 100)}
    _, got = streamed(tensors, rank_fn, [16, 16], 9)
    block, _ = dense(tensors["w"], rank_fn(100))
    assert np.array_equal(got["w"], block)


def test_an_empty_group_and_all_equal_values():
    _, got = streamed({"e": np.zeros(0, np.float32)}, equal_blocks(3), [16, 16], 4)
    assert got["e"].size == 0
    _, got = streamed({"z": np.zeros(10, np.float32)}, equal_blocks(3), [16, 16], 3)
    assert got["z"].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # pure position order
    tied = ranks.tied_blocks(ranks.refine(ranks.refine(ranks.new_search(10, [2, 5, 7], [16, 16]),
                                                       np.eye(1, 1 << 16, dtype=np.int64) * 10),
                                          np.eye(1, 1 << 16, dtype=np.int64) * 10))
    assert tied == [(0, 0, 2), (0, 1, 3), (0, 2, 2), (0, 3, 3)]


def test_chunks_out_of_order_are_refused():
    search = ranks.new_search(4, [2], [16, 16])
    hist = np.zeros((1, 1 << 16), np.int64)
    hist[0, 0] = 4
    search = ranks.refine(ranks.refine(search, hist), hist)
    with pytest.raises(ValueError, match="out of order"):
        ranks.tie_offsets(search, [(("w", 1), (2,)), (("w", 0), (2,))])
    with pytest.raises(ValueError, match="different data"):
        ranks.tie_offsets(search, [(("w", 0), (1,))])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 400), chunk=st.integers(1, 450), m=st.integers(1, 20),
       split=st.sampled_from([[16, 16], [16, 8, 8]]))
def test_property_any_chunking(seed, n, chunk, m, split):
    rng = np.random.default_rng(seed)
    values = heavy_ties(rng, n, zeros=rng.random())
    values[rng.random(n) < 0.2] = np.float32(2e-3)  # more ties
    cut = int(rng.integers(0, n + 1))
    tensors = {"x": values[:cut], "y": values[cut:]}
    rank_fn = lambda total: sorted(int(r) for r in np.random.default_rng(seed).integers(0, total + 1, m))
    search, got = streamed(tensors, rank_fn, split, chunk)
    block, found = dense(values, rank_fn(n))
    assert np.array_equal(np.concatenate([got["x"], got["y"]]), block)
    assert list(zip(ranks.thresholds(search)[0].tolist(), ranks.thresholds(search)[1])) == found
